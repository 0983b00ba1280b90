"""The grid of a sweep: its points (a training stage, a setting of dotted keys, a seed) and their
validation (see :mod:`rlhf_lightning.pipeline.sweep`)."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_lightning.pipeline.stages import STAGES

SWEEP_KEYS = {"stage", "config", "overrides", "grid", "seeds"}


class SweepConfigError(ValueError):
    """A sweep config that cannot run, found before anything runs."""


@dataclass(frozen=True)
class Point:
    """One run of a sweep: a training stage with some settings and a seed."""

    method: str  # the sweep's name
    stage: str  # the registered training stage it runs
    setting: dict[str, Any]  # grid key -> value
    seed: int
    config: str | None = None  # the stage's YAML (None: the shipped one)
    overrides: dict[str, Any] = field(default_factory=dict)  # fixed for every point of the sweep

    @property
    def setting_label(self) -> str:
        """``init_kl_coef=0.1,lr=1e-05``: the last part of each dotted key with its value."""
        return ",".join(f"{key.rsplit('.', 1)[-1]}={_fmt(value)}" for key, value in self.setting.items()) or "default"

    @property
    def name(self) -> str:
        return f"{self.method}/{self.setting_label}/seed{self.seed}"

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "method": self.method,
            "stage": self.stage,
            "setting": self.setting,
            "setting_label": self.setting_label,
            "seed": self.seed,
            "dir": str(Path("points") / self.name),
        }


def _fmt(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text.replace("/", "_").replace(" ", "")


def expand_grid(sweeps: dict[str, dict[str, Any]], seeds: list[int]) -> list[Point]:
    """Every point of every sweep: the product of its grid's values (keys in the order given,
    the last varying fastest), then its seeds (``seeds`` unless the sweep names its own).

    Raises:
        SweepConfigError: an unknown sweep key, a stage that is not a training stage, a grid
            that is not ``{dotted.key: [values]}`` or has an empty list, no seeds, two points
            with the same directory.
    """
    if not sweeps:
        raise SweepConfigError("sweeps: give at least one sweep, {name: {stage, grid, ...}}")
    points: list[Point] = []
    for method, spec in sweeps.items():
        spec = spec or {}
        where = f"sweeps.{method}"
        unknown = sorted(set(spec) - SWEEP_KEYS)
        if unknown:
            raise SweepConfigError(f"{where}: unknown key(s) {unknown}; a sweep takes {sorted(SWEEP_KEYS)}")
        stage = spec.get("stage", method)
        if stage not in STAGES or not STAGES[stage].trains:
            trains = [s.name for s in STAGES.values() if s.trains]
            raise SweepConfigError(f"{where}.stage: {stage!r} is not a training stage; one of {trains}")
        grid = spec.get("grid") or {}
        if not isinstance(grid, dict):
            raise SweepConfigError(f"{where}.grid: expected {{dotted.key: [values]}}, got {grid!r}")
        for key, values in grid.items():
            if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
                raise SweepConfigError(f"{where}.grid: {key!r} is not a dotted key such as model.init_args.beta")
            if not isinstance(values, list) or not values:
                raise SweepConfigError(f"{where}.grid.{key}: expected a non-empty list of values, got {values!r}")
        overrides = spec.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise SweepConfigError(f"{where}.overrides: expected {{dotted.key: value}}, got {overrides!r}")
        clash = sorted(set(grid) & set(overrides))
        if clash:
            raise SweepConfigError(f"{where}: {clash} both in grid and overrides; keep one")
        run_seeds = spec.get("seeds", seeds)
        if not isinstance(run_seeds, list) or not run_seeds or not all(isinstance(s, int) for s in run_seeds):
            raise SweepConfigError(f"{where}.seeds: expected a non-empty list of integers, got {run_seeds!r}")
        for values in itertools.product(*grid.values()):
            setting = dict(zip(grid, values, strict=True))
            for seed in run_seeds:
                points.append(Point(method, stage, setting, seed, spec.get("config"), dict(overrides)))
    names = [p.name for p in points]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SweepConfigError(f"two points share a directory: {twice} (a value repeated, or values that print alike)")
    return points
