"""Run a small pipeline (tiny Llama, demo task, every training stage) and print the sha256
of each stage's exported ``model.safetensors`` plus the evaluation's numbers.

A refactor that claims to change no computation must leave this output identical:

  python scripts/export_hashes.py --run_dir /tmp/h1 > before.json   # on the old commit
  python scripts/export_hashes.py --run_dir /tmp/h2 > after.json    # on the new one
  diff before.json after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
DEMO_SIZES = {"n_sft": 256, "n_pairs": 128, "n_val_pairs": 32, "n_prompts": 64, "n_heldout": 16}


def pipeline_args(run_dir: Path) -> list[str]:
    quiet = {"trainer.enable_progress_bar": False, "trainer.limit_val_batches": 2}
    stages = {
        "sft": {
            "config": str(ROOT / "configs/sft.yaml"),
            "overrides": {
                **quiet,
                "model.init_args.model_config": TINY,
                "trainer.max_steps": 12,
                "data.init_args.batch_size": 16,
            },
        },
        "reward": {
            "config": str(ROOT / "configs/reward.yaml"),
            "overrides": {**quiet, "trainer.max_steps": 6, "data.init_args.batch_size": 8},
        },
        "ppo": {
            "config": str(ROOT / "configs/ppo.yaml"),
            "overrides": {
                "trainer.enable_progress_bar": False,
                "trainer.max_steps": 12,
                "data.init_args.batch_size": 8,
                "model.init_args.minibatch_size": 8,
                "model.init_args.sampling": {"max_new_tokens": 12},
                "data.init_args.val_batch_size": 8,
            },
        },
        "dpo": {
            "config": str(ROOT / "configs/dpo.yaml"),
            "overrides": {**quiet, "trainer.max_steps": 6, "data.init_args.batch_size": 8},
        },
    }
    return [
        "pipeline",
        "-c",
        str(ROOT / "configs/quickstart.yaml"),
        f"--run_dir={run_dir}",
        json.dumps({"demo": True, "demo_sizes": DEMO_SIZES}).join(["--data=", ""]),
        f"--stages={json.dumps(stages)}",
        '--evaluate={"max_new_tokens": 12, "max_prompts": 16}',
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run_dir", required=True)
    args = ap.parse_args()
    run_dir = Path(args.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rlhf_lightning.cli import cli_main

    stdout = sys.stdout
    sys.stdout = sys.stderr  # keep stdout for the result
    try:
        cli_main(pipeline_args(run_dir))
    finally:
        sys.stdout = stdout
    out = {
        stage: hashlib.sha256((run_dir / stage / "hf" / "model.safetensors").read_bytes()).hexdigest()
        for stage in ("sft", "reward", "ppo", "dpo")
    }
    out["eval"] = json.loads((run_dir / "eval.json").read_text())["policies"]
    print(json.dumps(out, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
