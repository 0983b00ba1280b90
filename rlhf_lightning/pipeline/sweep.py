"""``rlhf-lightning sweep``: a grid of settings x seeds of training stages, from the same exports.

A sweep config (``configs/frontier.yaml``) names

* ``base``: an ordinary pipeline (data, SFT, reward model) run in ``<run_dir>/base``, whose
  exports every point starts from; it also evaluates the SFT policy (the frontier's origin);
* ``sweeps``: ``{name: {stage, config, overrides, grid, seeds}}``: each expands to the product
  of its ``grid`` (dotted keys of the stage's config, each with a list of values) and its
  seeds. A point is an ordinary run of the training stage followed by the evaluation, in
  ``<run_dir>/points/<name>/<key=value,...>/seed<k>``, through the same runner as
  ``rlhf-lightning pipeline`` (its ``point.yaml`` re-runs it by hand);
* ``best_of_n``: the best-of-n baseline from the SFT export, scored by the reward model;
* ``evaluate``: the sampling of every evaluation (the same prompts and seed for every point).

Every point's full config is parsed by the stage's own parser before anything runs, so an
unknown key, a value of the wrong type or an empty list fails at once. A point with an
evaluation is done and skipped; an interrupted one continues from its ``last.ckpt``, so a
sweep is resumed by running the same command again. A point whose directory holds a run of
another config (say the grid's fixed overrides changed) stops the sweep before it starts. Points run one after another
(``--workers 1``), in parallel subprocesses (``--workers N``, torch threads split between
them), or as a SLURM job array (``--launcher slurm`` writes the scripts and submits nothing).
At the end the frontier report (``frontier.md``) is written from whatever has finished.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser

from rlhf_lightning.pipeline.grid import Point, SweepConfigError, expand_grid
from rlhf_lightning.pipeline.runner import Pipeline
from rlhf_lightning.pipeline.slurm import point_command, slurm_scripts
from rlhf_lightning.pipeline.stages import DATA_INPUTS, STAGES
from rlhf_lightning.rundir import RunDirLock

log = logging.getLogger(__name__)

__all__ = ["Point", "Sweep", "SweepConfigError", "expand_grid", "main", "point_command", "slurm_scripts"]


class Sweep:
    """Runs a sweep config (see the module docstring)."""

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = cfg
        self.run_dir = Path(cfg["run_dir"])
        self.points = expand_grid(cfg.get("sweeps") or {}, cfg.get("seeds") or [cfg.get("seed", 0)])

    # ------------------------------------------------------------------ configs
    def base_config(self) -> dict[str, Any]:
        base = copy.deepcopy(self.cfg.get("base") or {})
        unknown = sorted(set(base) - {"data", "gold_reward", "stages", "exports"})
        if unknown:
            raise SweepConfigError(f"base: unknown key(s) {unknown}; it takes data, gold_reward, stages, exports")
        return {
            "run_dir": str(self.run_dir / "base"),
            "seed": self.cfg.get("seed", 0),
            "data": base.get("data"),
            "gold_reward": base.get("gold_reward"),
            "stages": base.get("stages") or {},
            "exports": base.get("exports"),
            "evaluate": self.evaluate_settings(),
        }

    def evaluate_settings(self) -> dict[str, Any]:
        ev = dict(self.cfg.get("evaluate") or {})
        ev.setdefault("seed", self.cfg.get("seed", 0))  # one evaluation stream for every point
        return ev

    def base_pipeline(self) -> Pipeline:
        return Pipeline(self.base_config())

    def point_dir(self, point: Point) -> Path:
        return self.run_dir / "points" / point.name

    def point_config(self, point: Point) -> dict[str, Any]:
        """The pipeline config of one point: the base's data files and exports as inputs, the
        stage with the sweep's overrides and the point's setting, the point's seed."""
        base = self.base_pipeline()
        inputs = base.inputs
        data = {name: inputs[name] for name in DATA_INPUTS if inputs.get(name)}
        # The exports the stage reads, and the evaluation's reference and reward model: named
        # explicitly, so a point's config never mentions stages only this process registered.
        wanted = {*STAGES[point.stage].consumes, *STAGES["evaluate"].consumes, "reward"}
        exports = {s.name: inputs[s.name] for s in STAGES.values() if s.trains and s.name in wanted - {point.stage}}
        stage: dict[str, Any] = {"overrides": {**point.overrides, **point.setting}}
        if point.config:
            stage["config"] = point.config
        return {
            "run_dir": str(self.point_dir(point)),
            "seed": point.seed,
            "data": {"demo": False, **data},
            "gold_reward": inputs["gold_reward"],
            "exports": exports,
            "stages": {point.stage: stage},
            "evaluate": self.evaluate_settings(),
            "only": [point.stage, "evaluate"],
            "resume": True,
        }

    def write_point_config(self, point: Point) -> Path:
        path = self.point_dir(point) / "point.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.point_config(point), sort_keys=False))
        return path

    def stale_points(self) -> list[str]:
        """Points whose directory holds a run of another config (the grid's fixed overrides, the
        base or the evaluation changed since): skipping or resuming them would mix settings."""
        stale = []
        for point in self.points:
            path = self.point_dir(point) / "point.yaml"
            if path.exists() and yaml.safe_load(path.read_text()) != self.point_config(point):
                stale.append(point.name)
        return stale

    def is_done(self, point: Point) -> bool:
        return (self.point_dir(point) / "eval.json").exists()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Parse every distinct setting's full stage config with the stage's own parser (types,
        unknown keys, interpolations), before anything runs. Seeds change nothing a parser sees."""
        from rlhf_lightning.trainer_cli import parse_only

        self.base_config()  # its keys
        seen: set[tuple[str, str]] = set()
        for point in self.points:
            key = (point.method, point.setting_label)
            if key in seen:
                continue
            seen.add(key)
            cfg = self.point_config(point)
            pipeline = Pipeline({k: v for k, v in cfg.items() if k not in ("only", "resume")})
            stage_cfg = pipeline.stage_config(STAGES[point.stage], check=False)
            try:
                parse_only(stage_cfg)
            except SystemExit as exc:  # the parser has printed the key and the problem
                raise SweepConfigError(
                    f"sweeps.{point.method}, point {point.setting_label}: the {point.stage!r} stage's config does "
                    "not parse (the message above names the key)"
                ) from exc

    # ------------------------------------------------------------------ running
    def describe_points(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        rows = [p.describe() for p in self.points]
        (self.run_dir / "points.json").write_text(json.dumps(rows, indent=2) + "\n")

    def run_base(self) -> None:
        base = self.base_pipeline()
        names = ["data", *(base.cfg["stages"] or {}), "evaluate"]
        print(f"=== sweep base: {', '.join(names)} in {base.run_dir} ===", flush=True)
        base.run(names, resume=True)

    def run_point(self, point: Point) -> None:
        cfg = self.point_config(point)
        only = cfg.pop("only")
        cfg.pop("resume")
        Pipeline(cfg).run(only, resume=True)

    def run(self, workers: int = 1) -> dict[str, str]:
        """Base, then every point not yet done, then best-of-n and the report. Returns each
        point's status (done, skipped, failed); a failed point does not stop the others."""
        with RunDirLock(self.run_dir):
            (self.run_dir / "sweep.yaml").write_text(yaml.safe_dump(self.cfg, sort_keys=False))
            self.describe_points()
            seconds = {}
            t0 = time.perf_counter()
            self.run_base()
            seconds["base"] = time.perf_counter() - t0
            todo = [p for p in self.points if not self.is_done(p)]
            status = {p.name: "skipped (done)" for p in self.points if self.is_done(p)}
            print(f"=== sweep: {len(self.points)} points, {len(status)} done, {len(todo)} to run ===", flush=True)
            for p in todo:
                self.write_point_config(p)
            t1 = time.perf_counter()
            if workers <= 1:
                for i, point in enumerate(todo, 1):
                    status[point.name] = self._run_in_process(point, i, len(todo))
            else:
                status.update(self._run_subprocesses(todo, workers))
            t2 = time.perf_counter()
            seconds["points"] = t2 - t1
            self.run_best_of_n()
            seconds["best_of_n"] = time.perf_counter() - t2
            self.report()
            seconds["total"] = time.perf_counter() - t0
            self._save_state(status, seconds, workers)
        counts = {k: sum(v.split(":")[0].startswith(k) for v in status.values()) for k in ("done", "skipped", "failed")}
        print(f"=== sweep: {counts} in {seconds['total']:.0f} s ===", flush=True)
        failed = [name for name, s in status.items() if s.startswith("failed")]
        if failed:
            raise RuntimeError(f"{len(failed)} point(s) failed: {failed}; run the same command to retry them")
        return status

    def _save_state(self, status: dict[str, str], seconds: dict[str, float], workers: int) -> None:
        """``sweep_state.json``: this call's wall times (base, points, best-of-n, total) and each
        point's status; each point's own stage times are in its ``pipeline_state.json``."""
        state = {
            "workers": workers,
            "seconds": {k: round(v, 1) for k, v in seconds.items()},
            "points": status,
        }
        (self.run_dir / "sweep_state.json").write_text(json.dumps(state, indent=2) + "\n")

    def _run_in_process(self, point: Point, i: int, n: int) -> str:
        print(f"=== sweep point {i}/{n}: {point.name} ===", flush=True)
        t0 = time.perf_counter()
        try:
            self.run_point(point)
        except Exception as exc:  # noqa: BLE001  (reported, and the other points still run)
            log.exception("point %s failed", point.name)
            return f"failed: {type(exc).__name__}: {exc}"
        print(f"=== sweep point {point.name} done in {time.perf_counter() - t0:.0f} s ===", flush=True)
        return "done"

    def _run_subprocesses(self, todo: list[Point], workers: int) -> dict[str, str]:
        threads = max(1, (os.cpu_count() or 1) // workers)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        queue, running, status = list(todo), {}, {}
        while queue or running:
            while queue and len(running) < workers:
                point = queue.pop(0)
                log_file = (self.point_dir(point) / "sweep.log").open("a")
                cmd = point_command(self.point_dir(point) / "point.yaml", python=sys.executable)
                print(f"=== sweep point {point.name}: started (log: {log_file.name}) ===", flush=True)
                proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
                running[proc] = (point, log_file)
            time.sleep(0.5)
            for proc in [p for p in running if p.poll() is not None]:
                point, log_file = running.pop(proc)
                log_file.close()
                ok = proc.returncode == 0 and self.is_done(point)
                status[point.name] = "done" if ok else f"failed: exit {proc.returncode}, see {log_file.name}"
                print(f"=== sweep point {point.name}: {status[point.name]} ===", flush=True)
        return status

    def run_best_of_n(self) -> None:
        spec = self.cfg.get("best_of_n")
        out = self.run_dir / "best_of_n.json"
        if not spec or out.exists():
            return
        from rlhf_lightning.eval.best_of_n import best_of_n
        from rlhf_lightning.generation import SamplingConfig

        base = self.base_pipeline()
        inputs = base.inputs
        ev = self.evaluate_settings()
        print("=== sweep: best-of-n baseline ===", flush=True)
        best_of_n(
            policy=inputs["sft"],
            reward_model=inputs["reward"],
            prompts_file=inputs["heldout_prompts_file"],
            gold_reward=inputs["gold_reward"],
            ns=tuple(spec.get("n") or (1, 2, 4, 8, 16, 32, 64)),
            max_prompts=spec.get("max_prompts", ev.get("max_prompts")),
            sampling=SamplingConfig(
                max_new_tokens=ev.get("max_new_tokens", 48),
                temperature=ev.get("temperature", 1.0),
                top_k=ev.get("top_k", 0),
                top_p=ev.get("top_p", 1.0),
            ),
            batch_size=spec.get("batch_size", 64),
            seed=ev["seed"],
            out_dir=str(self.run_dir),
        )

    def report(self) -> Path:
        from rlhf_lightning.report.frontier import write_frontier_report

        path = write_frontier_report(self.run_dir)
        print(f"frontier report: {path}", flush=True)
        return path

    # ------------------------------------------------------------------ SLURM
    def write_slurm(self, slurm: dict[str, Any] | None = None, config_file: str | None = None) -> Path:
        """``<run_dir>/slurm/``: ``base.sbatch`` (the shared exports), ``points.sbatch`` (a job array,
        one task per point not yet done, after the base), ``report.sbatch`` (best-of-n and the
        report, after every task) and ``submit.sh``, which submits the three with their dependencies."""
        slurm = dict(slurm or {})
        out = self.run_dir / "slurm"
        out.mkdir(parents=True, exist_ok=True)
        self.describe_points()
        (self.run_dir / "sweep.yaml").write_text(yaml.safe_dump(self.cfg, sort_keys=False))
        todo = [p for p in self.points if not self.is_done(p)]
        paths = [str(self.write_point_config(p).resolve()) for p in todo]
        (out / "points.txt").write_text("".join(f"{p}\n" for p in paths))
        base_file = self.run_dir / "base.yaml"
        base_cfg = self.base_config()
        base_cfg["only"] = ["data", *(base_cfg["stages"] or {}), "evaluate"]
        base_cfg["resume"] = True
        base_file.write_text(yaml.safe_dump(base_cfg, sort_keys=False))
        sweep_file = str(Path(config_file or self.run_dir / "sweep.yaml").resolve())
        text = slurm_scripts(
            run_dir=str(self.run_dir.resolve()),
            n_points=len(paths),
            base_config=str(base_file.resolve()),
            sweep_config=sweep_file,
            workdir=str(Path.cwd()),
            **slurm,
        )
        for name, content in text.items():
            (out / name).write_text(content)
        (out / "submit.sh").chmod(0o755)
        return out


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="rlhf-lightning sweep", description=__doc__)
    parser.add_argument("-c", "--config", action=ActionConfigFile)
    parser.add_argument("--run_dir", type=str, default="runs/frontier")
    parser.add_argument("--seed", type=int, default=0, help="the base pipeline's seed and the evaluation's")
    parser.add_argument("--seeds", type=list[int], default=[0], help="training seeds of every point (per sweep: seeds)")
    parser.add_argument(
        "--base",
        type=dict[str, Any] | None,
        default=None,
        help="the pipeline that makes the shared inputs: data, gold_reward, stages, exports (see `pipeline`)",
    )
    parser.add_argument(
        "--sweeps",
        type=dict[str, dict[str, Any] | None],
        default={},
        help="{name: {stage, config, overrides, grid: {dotted.key: [values]}, seeds}}",
    )
    parser.add_argument(
        "--best_of_n", type=dict[str, Any] | None, default=None, help="n (list), max_prompts, batch_size"
    )
    parser.add_argument(
        "--evaluate",
        type=dict[str, Any] | None,
        default=None,
        help="sampling for every evaluation: max_new_tokens, temperature, top_k, top_p, max_prompts, seed",
    )
    parser.add_argument("--workers", type=int, default=1, help="points run at once (subprocesses when > 1)")
    parser.add_argument("--launcher", type=str, default="local", choices=["local", "slurm"])
    parser.add_argument(
        "--slurm",
        type=dict[str, Any] | None,
        default=None,
        help="partition, time_limit, gpus_per_task, cpus_per_task, max_parallel, setup (shell line), extra (#SBATCH)",
    )
    parser.add_argument("--dry_run", type=bool, default=False, help="validate and list the points; run nothing")
    parser.add_argument(
        "--report_only", type=bool, default=False, help="run no point: best-of-n (if missing) and the report"
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, str] | Path | list[Point]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    ns = parser.parse_args(argv)
    cfg = ns.as_dict()
    config_files = cfg.pop("config", None)
    workers, launcher, slurm, dry_run, report_only = (
        cfg.pop(k) for k in ("workers", "launcher", "slurm", "dry_run", "report_only")
    )
    try:
        sweep = Sweep(cfg)
        sweep.validate()
        stale = sweep.stale_points()
        if stale:
            raise SweepConfigError(
                f"{len(stale)} point(s) in {sweep.run_dir} ran with another config than this one: {stale}; "
                "delete their directories to run them again, or choose a new --run_dir"
            )
    except SweepConfigError as exc:
        parser.error(str(exc))
    if workers < 1:
        parser.error(f"--workers must be at least 1, got {workers}")
    if dry_run:
        for p in sweep.points:
            print(f"{'done' if sweep.is_done(p) else 'todo'}  {p.name}")
        return sweep.points
    if report_only:
        sweep.run_best_of_n()
        return sweep.report()
    if launcher == "slurm":
        first = str(config_files[0]) if config_files else None
        out = sweep.write_slurm(slurm, first)
        print(f"SLURM scripts in {out}; submit with: bash {out / 'submit.sh'}")
        return out
    return sweep.run(workers)
