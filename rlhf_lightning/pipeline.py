"""``rlhf-lightning pipeline``: data → SFT → reward model → PPO and DPO → evaluation → report.

Each training stage is an ordinary ``rlhf-lightning fit`` run: the pipeline reads the
stage's YAML from ``configs/``, points its paths into one run directory, writes the
resolved config to ``<run_dir>/<stage>/config.yaml`` (so any stage can be re-run by
hand with ``rlhf-lightning fit -c`` on that file) and runs it. A stage whose export
already exists is skipped; with ``--resume`` an interrupted stage continues from its
``last.ckpt``. Progress and wall times are kept in ``<run_dir>/pipeline_state.json``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentParser, ActionConfigFile

log = logging.getLogger(__name__)

STAGES = ("data", "sft", "reward", "ppo", "dpo", "evaluate", "report")
TRAINING_STAGES = ("sft", "reward", "ppo", "dpo")
# Prefixes the stage configs use for their inputs and outputs; the pipeline moves both into run_dir.
DATA_PREFIX, RUNS_PREFIX = "data/demo/", "runs/demo/"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the checkout holding configs/


def _rewrite(value: Any, mapping: dict[str, str]) -> Any:
    """Replace path prefixes in every string of a nested config."""
    if isinstance(value, str):
        for old, new in mapping.items():
            if value.startswith(old):
                return new + value[len(old):]
        return value
    if isinstance(value, list):
        return [_rewrite(v, mapping) for v in value]
    if isinstance(value, dict):
        return {k: _rewrite(v, mapping) for k, v in value.items()}
    return value


class Pipeline:
    """Runs the stages in order inside one run directory (see the module docstring)."""

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = cfg
        self.run_dir = Path(cfg["run_dir"])
        self.state_file = self.run_dir / "pipeline_state.json"
        self.state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {"stages": {}}

    # ------------------------------------------------------------------ paths
    def data_path(self, key: str, default: str) -> str:
        given = (self.cfg.get("data") or {}).get(key)
        return given if given else str(self.run_dir / "data" / default)

    @property
    def tokenizer_path(self) -> str:
        return (self.cfg.get("data") or {}).get("tokenizer") or str(self.run_dir / "data" / "tokenizer")

    def export(self, stage: str) -> Path:
        return self.run_dir / stage / "hf"

    def _save_state(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(self.state, indent=2))

    def _done(self, stage: str) -> bool:
        if stage in TRAINING_STAGES:
            return (self.export(stage) / "config.json").exists()
        if stage == "data":
            return Path(self.tokenizer_path).exists() and Path(self.data_path("sft_file", "sft.jsonl")).exists()
        if stage == "evaluate":
            return (self.run_dir / "eval.json").exists()
        return False  # the report is cheap: always rewritten

    # ------------------------------------------------------------------ stages
    def run_data(self) -> None:
        data = self.cfg.get("data") or {}
        if data.get("demo", True) and not data.get("sft_file"):
            from rlhf_lightning.data.demo import write_demo_data

            summary = write_demo_data(self.run_dir / "data", seed=self.cfg["seed"], **(data.get("demo_sizes") or {}))
            log.info("demo task: %s", {k: summary[k] for k in ("sft_gold_mean", "preference_ceiling_val") if k in summary})
            return
        if not data.get("tokenizer"):  # user data, model from scratch: train a tokenizer on it
            from rlhf_lightning.data.records import load_examples
            from rlhf_lightning.data.tokenizer import train_tokenizer

            texts = []
            for key, kind in (("sft_file", "sft"), ("preference_train_file", "preference"), ("prompts_file", "prompt")):
                if data.get(key):
                    for ex in load_examples(data[key], kind):
                        texts += [v for v in vars(ex).values() if isinstance(v, str)]
            train_tokenizer(texts, vocab_size=data.get("vocab_size", 2000), out_dir=self.tokenizer_path)

    def stage_config(self, stage: str) -> dict[str, Any]:
        spec = self.cfg["stages"][stage]
        config_path = Path(spec["config"])
        if not config_path.exists() and (PACKAGE_ROOT / config_path).exists():
            config_path = PACKAGE_ROOT / config_path  # configs/... from another directory (a notebook, say)
        cfg = yaml.safe_load(config_path.read_text())
        cfg = _rewrite(cfg, {DATA_PREFIX: str(self.run_dir / "data") + "/", RUNS_PREFIX: str(self.run_dir) + "/"})
        cfg["seed_everything"] = self.cfg["seed"]
        d = cfg["data"]["init_args"]
        d["tokenizer"] = self.tokenizer_path
        files = {
            "sft": {"train_file": self.data_path("sft_file", "sft.jsonl")},
            "reward": {"train_file": self.data_path("preference_train_file", "preferences_train.jsonl"),
                       "val_file": self.data_path("preference_val_file", "preferences_val.jsonl")},
            "dpo": {"train_file": self.data_path("preference_train_file", "preferences_train.jsonl"),
                    "val_file": self.data_path("preference_val_file", "preferences_val.jsonl")},
            "ppo": {"train_file": self.data_path("prompts_file", "prompts_train.jsonl"),
                    "eval_file": self.data_path("heldout_prompts_file", "prompts_heldout.jsonl")},
        }[stage]
        d.update(files)
        if stage == "reward":
            for cb in cfg["trainer"].get("callbacks", []):
                if cb["class_path"].endswith("RewardNormalization"):
                    cb.setdefault("init_args", {})["samples_file"] = self.data_path("sft_file", "sft.jsonl")
        if stage == "ppo":
            for cb in cfg["trainer"].get("callbacks", []):
                if cb["class_path"].endswith("GoldRewardEval"):
                    cb.setdefault("init_args", {})["gold_reward"] = self.cfg.get("gold_reward")
        for key, value in (spec.get("overrides") or {}).items():  # dotted keys, e.g. trainer.max_steps
            node = cfg
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        return cfg

    def run_training(self, stage: str, resume: bool) -> None:
        from rlhf_lightning.cli import cli_main

        cfg = self.stage_config(stage)
        stage_dir = self.run_dir / stage
        stage_dir.mkdir(parents=True, exist_ok=True)
        config_file = stage_dir / "config.yaml"
        config_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
        args = ["fit", "-c", str(config_file)]
        last = stage_dir / "checkpoints" / "last.ckpt"
        if resume and last.exists():
            print(f"    resuming {stage} from {last}", flush=True)
            args += ["--ckpt_path", str(last)]
        cli = cli_main(args)
        if cli.trainer.interrupted or not (self.export(stage) / "config.json").exists():
            raise RuntimeError(f"stage {stage} did not finish; run again with --resume to continue from {last}")

    def run_evaluate(self) -> None:
        from rlhf_lightning.evaluation import evaluate_policies
        from rlhf_lightning.generation import SamplingConfig

        ev = self.cfg.get("evaluate") or {}
        policies = {name: str(self.export(name)) for name in ("sft", "ppo", "dpo") if (self.export(name) / "config.json").exists()}
        evaluate_policies(
            policies,
            prompts_file=self.data_path("heldout_prompts_file", "prompts_heldout.jsonl"),
            reference=str(self.export("sft")),
            reward_model=str(self.export("reward")) if (self.export("reward") / "config.json").exists() else None,
            gold_reward=self.cfg.get("gold_reward"),
            sampling=SamplingConfig(max_new_tokens=ev.get("max_new_tokens", 48), temperature=ev.get("temperature", 1.0),
                                    top_k=ev.get("top_k", 0), top_p=ev.get("top_p", 1.0)),
            max_prompts=ev.get("max_prompts"),
            seed=self.cfg["seed"],
            out_dir=str(self.run_dir),
        )

    def run_report(self) -> None:
        from rlhf_lightning.report import summary_lines, write_report

        path = write_report(self.run_dir)
        for line in summary_lines(self.run_dir):
            print(line)
        print(f"report: {path}")

    # ------------------------------------------------------------------ driver
    def run(self, stages: list[str], resume: bool = False) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "pipeline.yaml").write_text(yaml.safe_dump(self.cfg, sort_keys=False))
        for i, stage in enumerate(stages, 1):
            banner = f"stage {i}/{len(stages)}: {stage}"
            if self._done(stage):
                print(f"=== {banner} (already done: skipped) ===", flush=True)
                continue
            print(f"=== {banner} ===", flush=True)
            t0 = time.perf_counter()
            try:
                if stage in TRAINING_STAGES:
                    self.run_training(stage, resume)
                else:
                    getattr(self, f"run_{stage}")()
            except BaseException:
                print(f"=== stage {stage} stopped; run the same command with --resume to continue ===", flush=True)
                raise
            seconds = time.perf_counter() - t0
            self.state["stages"][stage] = {"status": "done", "seconds": round(seconds, 1)}
            self._save_state()
            print(f"=== {banner} done in {seconds:.0f} s ===", flush=True)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="rlhf-lightning pipeline", description=__doc__)
    parser.add_argument("-c", "--config", action=ActionConfigFile)
    parser.add_argument("--run_dir", type=str, default="runs/quickstart")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", type=bool, default=False, help="continue interrupted stages from last.ckpt")
    parser.add_argument("--only", type=list[str] | None, default=None, help=f"run only these stages, of {list(STAGES)}")
    parser.add_argument("--gold_reward", type=str | None, default="rlhf_lightning.data.demo:gold_reward",
                        help="module:function (prompt, response) -> float, or null when the task has none")
    parser.add_argument("--data", type=dict[str, Any] | None, default=None,
                        help="data files: sft_file, preference_train_file, preference_val_file, prompts_file, "
                             "heldout_prompts_file, tokenizer (else demo data), demo_sizes")
    parser.add_argument("--stages", type=dict[str, dict[str, Any]], default={
        "sft": {"config": "configs/sft.yaml"}, "reward": {"config": "configs/reward.yaml"},
        "ppo": {"config": "configs/ppo.yaml"}, "dpo": {"config": "configs/dpo.yaml"}},
        help="per stage: config (a YAML of configs/) and overrides (dotted keys)")
    parser.add_argument("--evaluate", type=dict[str, Any] | None, default=None,
                        help="sampling for evaluation: max_new_tokens, temperature, top_k, top_p, max_prompts")
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    ns = parser.parse_args(argv)
    cfg = ns.as_dict()
    cfg.pop("config", None)
    resume, only = cfg.pop("resume"), cfg.pop("only")
    stages = [s for s in STAGES if (only is None or s in only) and (s not in TRAINING_STAGES or s in cfg["stages"])]
    Pipeline(cfg).run(stages, resume=resume)
