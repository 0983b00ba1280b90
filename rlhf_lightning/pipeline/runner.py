"""``rlhf-lightning pipeline``: run the registered stages in order inside one run directory.

Each training stage is an ordinary ``rlhf-lightning fit`` run of its YAML. The runner
sets the stage's ``inputs`` (what the registry says it consumes, by name) and
``trainer.default_root_dir`` (``<run_dir>/<stage>``), applies the user's dotted
overrides, writes the result to ``<run_dir>/<stage>/config.yaml`` (re-runnable by hand
with ``rlhf-lightning fit -c``) and runs it. A stage whose output exists is skipped;
with ``--resume`` an interrupted stage continues from its ``last.ckpt``. Progress and
wall times are kept in ``<run_dir>/pipeline_state.json``. ``--exports {stage: path}`` takes
a stage's export from elsewhere (another run's SFT model, say): that stage is then not
trained, and everything that reads it reads the given path.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import time
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser

from rlhf_lightning.pipeline.stages import DATA_INPUTS, STAGES, Stage, derive_stage
from rlhf_lightning.rundir import RunDirLock

log = logging.getLogger(__name__)

# Where the demo stage writes each data input, under <run_dir>/data.
DEMO_FILES = {
    "tokenizer": "tokenizer",
    "sft_file": "sft.jsonl",
    "preference_train_file": "preferences_train.jsonl",
    "preference_val_file": "preferences_val.jsonl",
    "prompts_file": "prompts_train.jsonl",
    "heldout_prompts_file": "prompts_heldout.jsonl",
}


def config_path(name: str | Path) -> Path:
    """A config file: ``name`` as a path (absolute or from the working directory), else one of
    the configs shipped with the package (``sft.yaml`` or ``configs/sft.yaml``)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = importlib.resources.files("rlhf_lightning.configs").joinpath(path.name)
    if shipped.is_file():
        return Path(str(shipped))
    raise FileNotFoundError(f"no config {str(name)!r} here, nor among the shipped configs")


def _set_dotted(cfg: dict[str, Any], key: str, value: Any) -> None:
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


class Pipeline:
    """Runs stages in order inside one run directory (see the module docstring)."""

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = cfg
        self.run_dir = Path(cfg["run_dir"])
        self.state_file = self.run_dir / "pipeline_state.json"
        self.state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {"stages": {}}
        self.stage_specs: dict[str, dict[str, Any]] = cfg.get("stages") or {}

    # ------------------------------------------------------------------ inputs
    @property
    def data_cfg(self) -> dict[str, Any]:
        return self.cfg.get("data") or {}

    @property
    def uses_demo(self) -> bool:
        return bool(self.data_cfg.get("demo", True)) and not self.data_cfg.get("sft_file")

    def export(self, stage: str) -> Path:
        return self.run_dir / stage / "hf"

    @property
    def inputs(self) -> dict[str, str | None]:
        """Every input a stage may consume, by name."""
        data = self.data_cfg
        values: dict[str, str | None] = {}
        for name in DATA_INPUTS:
            default = str(self.run_dir / "data" / DEMO_FILES[name]) if self.uses_demo or name == "tokenizer" else None
            values[name] = data.get(name) or default
        values["gold_reward"] = self.cfg.get("gold_reward")
        given = self.cfg.get("exports") or {}
        for stage in STAGES.values():
            if stage.trains:
                values[stage.name] = str(given.get(stage.name) or self.export(stage.name))
            for name, rel in stage.outputs.items():
                values[name] = str(self.run_dir / stage.name / rel)
        return values

    @staticmethod
    def path_exists(path: str | None) -> bool:
        return path is not None and Path(path).exists()

    def resolve_inputs(self, stage: Stage, check: bool = True) -> dict[str, str | None]:
        """The values of what ``stage`` consumes (each from the name its spec's ``inputs`` maps it
        to, else its own); with ``check``, a missing export or stage output is an error naming its
        stage (without, the values are returned as they will be once they exist)."""
        values = self.inputs
        wiring = (self.stage_specs.get(stage.name) or {}).get("inputs") or {}
        out = {}
        for name in stage.consumes:
            source = wiring.get(name, name)
            if source not in values:
                raise ValueError(f"stage {stage.name!r}: inputs.{name} names {source!r}, not one of {list(values)}")
            value = values[source]
            writer = next((s.name for s in STAGES.values() if source in s.outputs), None)
            if source in STAGES and not (Path(value) / "config.json").exists():
                what, writer = f"the export of stage {source!r}, but {value} holds none", source
            elif writer and not Path(value).exists():
                what = f"{source!r}, written by stage {writer!r}, but there is no {value}"
            else:
                what = None
            if what and check:
                raise FileNotFoundError(
                    f"stage {stage.name!r} reads {what}: "
                    f"run the {writer!r} stage first (add it to --only, or remove it from --only's skips)"
                )
            out[name] = value
        return out

    def _done(self, stage: Stage) -> bool:
        if stage.trains and stage.name in (self.cfg.get("exports") or {}):
            return True  # made elsewhere
        if stage.trains:
            return (self.export(stage.name) / "config.json").exists()
        return stage.done(self)

    # ------------------------------------------------------------------ training stages
    def stage_config(self, stage: Stage, check: bool = True) -> dict[str, Any]:
        """The stage's YAML with its inputs, its directory, the seed and the user's overrides set
        (``check``: see :meth:`resolve_inputs`)."""
        spec = self.stage_specs.get(stage.name) or {}
        cfg = yaml.safe_load(config_path(spec.get("config") or stage.config).read_text())
        cfg["seed_everything"] = self.cfg["seed"]
        cfg.setdefault("inputs", {}).update(self.resolve_inputs(stage, check))
        cfg.setdefault("trainer", {})["default_root_dir"] = str(self.run_dir / stage.name)
        for key, value in (spec.get("overrides") or {}).items():  # dotted keys, e.g. trainer.max_steps
            _set_dotted(cfg, key, value)
        return cfg

    def run_training(self, stage: Stage, resume: bool) -> None:
        from rlhf_lightning.trainer_cli import run_lightning_cli

        cfg = self.stage_config(stage)
        stage_dir = self.run_dir / stage.name
        stage_dir.mkdir(parents=True, exist_ok=True)
        config_file = stage_dir / "config.yaml"
        config_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
        args = ["fit", "-c", str(config_file)]
        last = stage_dir / "checkpoints" / "last.ckpt"
        if resume and last.exists():
            print(f"    resuming {stage.name} from {last}", flush=True)
            args += ["--ckpt_path", str(last)]
        cli = run_lightning_cli(args)
        if cli.trainer.interrupted or not (self.export(stage.name) / "config.json").exists():
            raise RuntimeError(f"stage {stage.name} did not finish; run again with --resume to continue from {last}")

    # ------------------------------------------------------------------ other stages
    def make_data(self) -> None:
        """The demo task, or a tokenizer trained on the user's data when none is given."""
        data = self.data_cfg
        if self.uses_demo:
            from rlhf_lightning.data.demo import write_demo_data

            sizes, cai = data.get("demo_sizes") or {}, data.get("demo_cai")
            if cai:  # the demo with Constitutional-AI demonstrations in its SFT file (data/demo_cai.py)
                from rlhf_lightning.data.demo_cai import write_cai_demo_data

                cai = {**cai, "constitution": config_path(cai["constitution"])}
                summary = write_cai_demo_data(self.run_dir / "data", seed=self.cfg["seed"], **cai, **sizes)
            else:
                summary = write_demo_data(self.run_dir / "data", seed=self.cfg["seed"], **sizes)
            log.info(
                "demo task: %s", {k: summary[k] for k in ("sft_gold_mean", "preference_ceiling_val") if k in summary}
            )
            return
        if not data.get("tokenizer"):  # user data, model from scratch: train a tokenizer on it
            from rlhf_lightning.data.records import load_examples
            from rlhf_lightning.data.tokenizer import train_tokenizer

            texts = []
            for key, kind in (("sft_file", "sft"), ("preference_train_file", "preference"), ("prompts_file", "prompt")):
                if data.get(key):
                    for ex in load_examples(data[key], kind):
                        texts += [v for v in vars(ex).values() if isinstance(v, str)]
            train_tokenizer(texts, vocab_size=data.get("vocab_size", 2000), out_dir=self.inputs["tokenizer"])

    def evaluate(self) -> None:
        """Every policy export this run holds or was given, against the SFT export, on the held-out prompts."""
        from rlhf_lightning.eval import evaluate_policies
        from rlhf_lightning.generation import SamplingConfig

        inputs = self.resolve_inputs(STAGES["evaluate"])
        ev = self.cfg.get("evaluate") or {}
        everything = self.inputs
        policies = {
            s.name: everything[s.name]
            for s in STAGES.values()
            if s.policy and (Path(everything[s.name]) / "config.json").exists()
        }
        reward = Path(everything["reward"])
        evaluate_policies(
            policies,
            prompts_file=inputs["heldout_prompts_file"],
            reference=inputs["sft"],
            reward_model=str(reward) if (reward / "config.json").exists() else None,
            gold_reward=inputs["gold_reward"],
            sampling=SamplingConfig(
                max_new_tokens=ev.get("max_new_tokens", 48),
                temperature=ev.get("temperature", 1.0),
                top_k=ev.get("top_k", 0),
                top_p=ev.get("top_p", 1.0),
            ),
            max_prompts=ev.get("max_prompts"),
            seed=ev.get("seed", self.cfg["seed"]),
            out_dir=str(self.run_dir),
        )

    def report(self) -> None:
        from rlhf_lightning.report import summary_lines, write_report

        path = write_report(self.run_dir)
        for line in summary_lines(self.run_dir):
            print(line)
        print(f"report: {path}")

    # ------------------------------------------------------------------ driver
    def _save_state(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(self.state, indent=2))

    def run(self, names: list[str], resume: bool = False) -> None:
        unknown = [n for n in names if n not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; the registered stages are {list(STAGES)}")
        with RunDirLock(self.run_dir):  # before anything is written: a second pipeline here stops at once
            self._run(names, resume)

    def _run(self, names: list[str], resume: bool) -> None:
        (self.run_dir / "pipeline.yaml").write_text(yaml.safe_dump(self.cfg, sort_keys=False))
        for i, name in enumerate(names, 1):
            stage = STAGES[name]
            banner = f"stage {i}/{len(names)}: {name}"
            if self._done(stage):
                print(f"=== {banner} (already done: skipped) ===", flush=True)
                continue
            print(f"=== {banner} ===", flush=True)
            t0 = time.perf_counter()
            try:
                if stage.trains:
                    self.run_training(stage, resume)
                else:
                    stage.run(self)
            except BaseException:
                print(f"=== stage {name} stopped; run the same command with --resume to continue ===", flush=True)
                raise
            seconds = time.perf_counter() - t0
            self.state["stages"][name] = {"status": "done", "seconds": round(seconds, 1)}
            self._save_state()
            print(f"=== {banner} done in {seconds:.0f} s ===", flush=True)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="rlhf-lightning pipeline", description=__doc__)
    parser.add_argument("-c", "--config", action=ActionConfigFile)
    parser.add_argument("--run_dir", type=str, default="runs/quickstart")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", type=bool, default=False, help="continue interrupted stages from last.ckpt")
    parser.add_argument("--only", type=list[str] | None, default=None, help=f"run only these stages, of {list(STAGES)}")
    parser.add_argument(
        "--gold_reward",
        type=str | None,
        default=None,
        help="module:function (prompt, response) -> float, or null when the task has none",
    )
    parser.add_argument(
        "--data",
        type=dict[str, Any] | None,
        default=None,
        help=f"data inputs {list(DATA_INPUTS)} (files; else the demo task), demo (bool), demo_sizes, vocab_size",
    )
    parser.add_argument(
        "--stages",
        type=dict[str, dict[str, Any] | None] | None,
        default=None,
        help="training stages to run, each with an optional config (default: the shipped one), "
        "overrides (dotted keys), inputs (input name: the name it is read from) and, for a variant "
        "under a new name, like: <stage>; default: every registered training stage. Opt-in stages "
        "(Constitutional AI) run only when named here",
    )
    parser.add_argument(
        "--evaluate",
        type=dict[str, Any] | None,
        default=None,
        help="sampling for evaluation: max_new_tokens, temperature, top_k, top_p, max_prompts, seed (default: --seed)",
    )
    parser.add_argument(
        "--exports",
        type=dict[str, str] | None,
        default=None,
        help="exports of training stages made elsewhere, {stage: path}: used as that stage's output, "
        "which is then not trained here",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    cfg = parser.parse_args(argv).as_dict()
    cfg.pop("config", None)
    resume, only = cfg.pop("resume"), cfg.pop("only")
    specs = cfg.get("stages")
    for name, spec in (specs or {}).items():
        if name not in STAGES and (spec or {}).get("like"):
            derive_stage(name, spec["like"], spec.get("config"))
    unknown = sorted(set(specs or {}) - {s.name for s in STAGES.values() if s.trains or s.opt_in})
    if unknown:
        parser.error(
            f"--stages names {unknown}, which are not training stages of {list(STAGES)} "
            "(a variant of one needs 'like: <stage>')"
        )
    unknown = sorted(set(only or ()) - set(STAGES))
    if unknown:
        parser.error(f"--only names {unknown}, which are not stages of {list(STAGES)}")
    unknown = sorted(set(cfg.get("exports") or {}) - {s.name for s in STAGES.values() if s.trains})
    if unknown:
        parser.error(f"--exports names {unknown}, which are not training stages of {list(STAGES)}")
    names = [
        s.name
        for s in STAGES.values()
        if (only is None or s.name in only)
        and (s.name in (specs or {}) if s.opt_in else not s.trains or specs is None or s.name in specs)
    ]
    Pipeline(cfg).run(names, resume=resume)
