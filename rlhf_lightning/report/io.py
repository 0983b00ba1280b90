"""Reading what a run left behind: stage metrics CSVs, ``eval.json``, sample files, small JSON files.

Nothing here raises on a missing or unreadable file: the report shows what exists.
Stages are discovered, not listed: any directory of the run with a Lightning
``metrics.csv`` is a stage, so new stages (grpo, rloo, ...) appear without code changes.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Series = dict[str, list[tuple[float, float]]]  # {column: [(step, value), ...]}


def read_metrics_csv(path: str | os.PathLike) -> Series:
    """``{column: [(step, value), ...]}`` from a Lightning ``metrics.csv``, skipping blank cells.

    The x value is the ``step`` column (the row number when absent or blank); rows keep file order.
    """
    series: Series = {}
    with open(path, newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            step = _float(row.get("step"))
            x = float(i) if step is None else step
            for key, cell in row.items():
                if key in (None, "step", "epoch"):
                    continue
                value = _float(cell)
                if value is not None:
                    series.setdefault(key, []).append((x, value))
    return series


def _float(cell: Any) -> float | None:
    try:
        value = float(cell)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def find_metrics_csv(stage_dir: Path) -> Path | None:
    """``stage_dir/logs/metrics.csv``, else the newest ``logs/version_*/metrics.csv``; a ``.csv`` path as is."""
    if stage_dir.suffix == ".csv":
        return stage_dir if stage_dir.is_file() else None
    direct = stage_dir / "logs" / "metrics.csv"
    if direct.is_file():
        return direct
    versions = sorted((stage_dir / "logs").glob("version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    return versions[-1] if versions else None


def read_json(path: Path) -> Any:
    """The parsed file, or None when it is missing or unreadable (the latter logged)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        if path.exists():
            log.warning("could not read %s: %s", path, err)
        return None


def noise_ceiling(run_dir: Path, stage_dir: Path) -> float | None:
    """The demo task's label-noise ceiling (``data/summary.json``) for a reward model validated on
    the demo's preference pairs; None when the stage's ``config.yaml`` names other validation pairs
    (AI-feedback labels, say), whose noise that ceiling does not measure."""
    ceiling = (read_json(run_dir / "data" / "summary.json") or {}).get("preference_ceiling_val")
    config = stage_dir / "config.yaml"
    if ceiling is None or not config.is_file():
        return ceiling
    import yaml

    try:
        val = ((yaml.safe_load(config.read_text()) or {}).get("inputs") or {}).get("preference_val_file")
    except yaml.YAMLError as err:
        log.warning("could not read %s: %s", config, err)
        return ceiling
    demo = run_dir / "data" / "preferences_val.jsonl"
    return ceiling if val is None or Path(val).resolve() == demo.resolve() else None


def find_eval(run_dir: Path) -> Path | None:
    """``run_dir/eval.json``, else ``run_dir/eval/eval.json``, else None."""
    for cand in (run_dir / "eval.json", run_dir / "eval" / "eval.json"):
        if cand.is_file():
            return cand
    return None


def read_eval(run_dir: Path) -> tuple[Path | None, dict[str, Any]]:
    """``(path, content)`` of the run's ``eval.json`` (``(None, {})`` without one)."""
    path = find_eval(run_dir)
    return path, ((read_json(path) if path else None) or {})


def read_samples(path: Path) -> list[dict]:
    """The records of a JSON Lines file, skipping lines that are not JSON; ``[]`` when missing."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def discover_stages(run_dir: Path, evaluation: dict[str, Any] | None = None) -> dict[str, Path]:
    """``{stage: directory}`` for every stage of the run that left a ``metrics.csv``.

    Order: the stages of ``pipeline_state.json`` as they ran, then the evaluated policies
    of ``eval.json`` (a policy's stage directory is ``run_dir/<name>`` or the parent of its
    export), then any other sub-directory of ``run_dir``, by name.
    """
    candidates: list[tuple[str, Path]] = []
    state = read_json(run_dir / "pipeline_state.json") or {}
    candidates += [(name, run_dir / name) for name in (state.get("stages") or {})]
    evaluation = evaluation or {}
    exports = (evaluation.get("settings") or {}).get("policies") or {}
    for name in [*(evaluation.get("policies") or {}), *exports]:
        candidates.append((name, run_dir / name))
        if isinstance(exports.get(name), str):
            candidates.append((name, Path(exports[name]).expanduser().parent))
    candidates += [(child.name, child) for child in sorted(run_dir.iterdir())] if run_dir.is_dir() else []
    found: dict[str, Path] = {}
    for name, path in candidates:
        if name not in found and path.is_dir() and find_metrics_csv(path):
            found[name] = path
    return found


def resolve_stages(
    run_dir: Path, stages: dict[str, str] | None, evaluation: dict[str, Any] | None = None
) -> dict[str, Path]:
    """The stages given (paths relative to ``run_dir`` or absolute), else :func:`discover_stages`."""
    if stages is None:
        return discover_stages(run_dir, evaluation)
    return {name: (Path(p) if Path(p).is_absolute() else run_dir / p) for name, p in stages.items()}


def read_stage_series(stage_dirs: dict[str, Path]) -> dict[str, Series]:
    """``{stage: series}`` for the stages whose ``metrics.csv`` exists and reads."""
    series = {}
    for name, stage_dir in stage_dirs.items():
        path = find_metrics_csv(stage_dir)
        if path is not None:
            try:
                series[name] = read_metrics_csv(path)
            except (OSError, csv.Error) as err:
                log.warning("skipping stage %s: could not read %s (%s)", name, path, err)
    return series


def last_value(series: Series, *columns: str) -> float | None:
    """The last value of the first of ``columns`` that ``series`` has, else None."""
    for c in columns:
        if series.get(c):
            return series[c][-1][1]
    return None
