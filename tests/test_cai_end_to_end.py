"""configs/cai.yaml end to end on tiny settings: one command runs every CAI stage and the evaluation."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from rlhf_lightning.cli import cli_main
from tests.test_pipeline import DEMO_SIZES, TINY

ROOT = Path(__file__).resolve().parent.parent
QUIET = {"trainer.enable_progress_bar": False, "trainer.limit_val_batches": 1}
RL = {
    "trainer.max_steps": 2,
    "trainer.enable_progress_bar": False,
    "data.init_args.batch_size": 4,
    "model.init_args.sampling": {"max_new_tokens": 6},
    "data.init_args.val_batch_size": 8,
    "model.init_args.minibatch_size": 4,
}


@pytest.mark.slow
def test_cai_pipeline_end_to_end(tmp_path, monkeypatch, capsys):
    import rlhf_lightning.cai.generate as generate

    real = generate.complete

    def stops(*args, **kwargs):  # an untrained tiny model never samples EOS within a few tokens
        return [replace(c, ended=True) for c in real(*args, **kwargs)]

    monkeypatch.setattr("rlhf_lightning.cai.revise.complete", stops)
    monkeypatch.setattr("rlhf_lightning.cai.label.complete", stops)
    sampling = {"sampling": {"max_new_tokens": 4}, "max_prompts": 16}
    stages = {
        "sft": {"overrides": {"model.init_args.model_config": json.loads(TINY), "trainer.max_steps": 2, **QUIET}},
        "cai_revise": {"config": str(ROOT / "configs/cai_revise.yaml"), "overrides": sampling},
        "sl_cai": {"config": str(ROOT / "configs/sl_cai.yaml"), "overrides": {"trainer.max_steps": 2, **QUIET}},
        "cai_label": {"config": str(ROOT / "configs/cai_label.yaml"), "overrides": {**sampling, "val_fraction": 0.25}},
        "reward": {
            "inputs": {
                "preference_train_file": "cai_preference_train_file",
                "preference_val_file": "cai_preference_val_file",
                "sft_file": "cai_samples_file",
            },
            "overrides": {"trainer.max_steps": 2, **QUIET},
        },
        "rl_cai": {
            "like": "ppo",
            "inputs": {"sft": "sl_cai"},
            "overrides": {**RL, "model.init_args.minibatch_size": 4},
        },
    }
    cai = {
        "constitution": str(ROOT / "configs/constitution_demo.yaml"),
        "n_critique": 16,
        "n_revision": 16,
        "n_comparison": 0,
    }
    run_dir = tmp_path / "run"
    cli_main(
        [
            "pipeline",
            "-c",
            str(ROOT / "configs/cai.yaml"),
            f"--run_dir={run_dir}",
            f'--data={{"demo": true, "demo_sizes": {DEMO_SIZES}, "demo_cai": {json.dumps(cai)}}}',
            f"--stages={json.dumps(stages)}",
            '--evaluate={"max_new_tokens": 6, "max_prompts": 8}',
        ]
    )
    out = capsys.readouterr().out
    assert "stage 9/9: report" in out
    for name in ("cai_revise", "cai_label"):
        assert (run_dir / name / "stats.json").exists() and (run_dir / name / "config.yaml").exists()
    revise = json.loads((run_dir / "cai_revise/stats.json").read_text())["counts"]
    assert revise["prompts"] == 16 and revise["kept"] == len(
        (run_dir / "cai_revise/sft.jsonl").read_text().splitlines()
    )
    label = json.loads((run_dir / "cai_label/stats.json").read_text())
    assert label["feedback_model"] == str(run_dir / "sft/hf") and label["policy"] == str(run_dir / "sl_cai/hf")
    assert label["gold_agreement"] is None or 0 <= label["gold_agreement"] <= 1
    demo_sft = (run_dir / "data/sft.jsonl").read_text()
    assert "Which sentences of your review are negative?" in demo_sft  # the CAI demonstrations
    evaluation = json.loads((run_dir / "eval.json").read_text())["policies"]
    assert set(evaluation) == {"sft", "sl_cai", "rl_cai"}
    rl_cfg = yaml.safe_load((run_dir / "rl_cai/config.yaml").read_text())
    assert rl_cfg["inputs"]["sft"] == str(run_dir / "sl_cai/hf")
