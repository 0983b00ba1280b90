"""The one-command pipeline on tiny settings: every stage, skipping, resume, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhf_lightning.cli import cli_main

ROOT = Path(__file__).resolve().parent.parent
TINY = '{"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, ' \
       '"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}'
DEMO_SIZES = '{"n_sft": 96, "n_pairs": 64, "n_val_pairs": 16, "n_prompts": 32, "n_heldout": 8}'


def pipeline_args(run_dir: Path, sft_steps: int = 4) -> list[str]:
    stages = {
        "sft": {"config": str(ROOT / "configs/sft.yaml"),
                "overrides": {"model.init_args.model_config": json.loads(TINY), "trainer.max_steps": sft_steps,
                              "trainer.enable_progress_bar": False, "trainer.limit_val_batches": 1}},
        "reward": {"config": str(ROOT / "configs/reward.yaml"),
                   "overrides": {"trainer.max_steps": 2, "trainer.enable_progress_bar": False,
                                 "trainer.limit_val_batches": 1}},
        "ppo": {"config": str(ROOT / "configs/ppo.yaml"),
                "overrides": {"trainer.max_steps": 4, "trainer.enable_progress_bar": False,
                              "data.init_args.batch_size": 4, "model.init_args.minibatch_size": 4,
                              "model.init_args.sampling": {"max_new_tokens": 6},
                              "data.init_args.val_batch_size": 8}},
        "dpo": {"config": str(ROOT / "configs/dpo.yaml"),
                "overrides": {"trainer.max_steps": 2, "trainer.enable_progress_bar": False,
                              "trainer.limit_val_batches": 1}},
    }
    return ["pipeline", "-c", str(ROOT / "configs/quickstart.yaml"), f"--run_dir={run_dir}",
            f"--data={{\"demo\": true, \"demo_sizes\": {DEMO_SIZES}}}", f"--stages={json.dumps(stages)}",
            '--evaluate={"max_new_tokens": 6, "max_prompts": 8}']


@pytest.mark.slow
def test_pipeline_end_to_end_interrupt_and_resume(tmp_path, capsys, monkeypatch):
    from rlhf_lightning.systems.sft import SFTModule

    run_dir = tmp_path / "run"
    original_step = SFTModule.training_step
    calls = []

    def interrupted_step(self, batch, batch_idx):
        calls.append(self.global_step)
        if self.global_step == 2:
            raise RuntimeError("simulated crash")  # a node dying, say, in the middle of SFT
        return original_step(self, batch, batch_idx)

    monkeypatch.setattr(SFTModule, "training_step", interrupted_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli_main(pipeline_args(run_dir))
    assert "stage sft stopped; run the same command with --resume" in capsys.readouterr().out
    assert (run_dir / "sft/checkpoints/last.ckpt").exists() and not (run_dir / "sft/hf").exists()

    calls.clear()
    monkeypatch.setattr(SFTModule, "training_step", lambda self, b, i: calls.append(self.global_step) or original_step(self, b, i))
    capsys.readouterr()
    cli_main(pipeline_args(run_dir) + ["--resume=true"])
    out = capsys.readouterr().out
    assert "stage 1/7: data (already done: skipped)" in out
    assert f"resuming sft from {run_dir / 'sft/checkpoints/last.ckpt'}" in out
    assert calls == [2, 3]  # continued at step 2 instead of starting over
    assert torch.load(run_dir / "sft/checkpoints/last.ckpt", weights_only=False)["global_step"] == 4
    assert "stage 7/7: report" in out
    for stage in ("sft", "reward", "ppo", "dpo"):
        assert (run_dir / stage / "hf" / "config.json").exists(), stage
        assert (run_dir / stage / "config.yaml").exists()  # the resolved stage config, re-runnable by hand
    evaluation = json.loads((run_dir / "eval.json").read_text())["policies"]
    assert set(evaluation) == {"sft", "ppo", "dpo"}
    for name, m in evaluation.items():
        for key in ("gold_reward_mean", "proxy_reward_mean", "kl_to_ref", "eos_rate", "response_length_mean",
                    "distinct_2", "win_rate_vs_sft_gold"):
            assert key in m, (name, key)
    assert evaluation["sft"]["kl_to_ref"] == 0.0 and evaluation["sft"]["win_rate_vs_sft_gold"] == 0.5
    report = (run_dir / "report.md").read_text()
    assert "ppo" in report and "dpo" in report
    figures = list((run_dir / "figures").glob("*.png"))
    assert figures and all(f.stat().st_size > 1000 and f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in figures)
    state = json.loads((run_dir / "pipeline_state.json").read_text())["stages"]
    assert {"sft", "reward", "ppo", "dpo", "evaluate"} <= set(state)
    # Another call finds every export and skips every training stage.
    capsys.readouterr()
    cli_main(pipeline_args(run_dir) + ["--only=[sft, reward, ppo, dpo]"])
    assert capsys.readouterr().out.count("already done: skipped") == 4
