"""Online RL under 2-process CPU DDP: whole groups per rank, disjoint prompts, one policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_online_rl import policy_export  # noqa: F401  (fixture)

SCRIPT = Path(__file__).parent / "scripts" / "ddp_online_rl.py"
# Eight distinct prompts: two steps of 2 prompts x 2 ranks, so any overlap between ranks shows.
PROMPTS = [f"{start} {end}" for start in ("The movie was", "I hated this film") for end in "abcd"]


def run_ddp(exports, out_dir: Path, estimator: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    prompts = out_dir / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    args = [sys.executable, str(SCRIPT), exports["sft"], exports["tokenizer"], str(prompts), str(out_dir)]
    proc = subprocess.run([*args, estimator], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_grpo_groups_stay_whole_on_their_rank(policy_export, tmp_path):  # noqa: F811
    ranks = run_ddp(policy_export, tmp_path, "grpo")
    assert [r["world_size"] for r in ranks] == [2, 2]
    for rank in ranks:
        assert len(rank["rollouts"]) == 2  # two iterations
        for rollout in rank["rollouts"]:
            groups: dict[int, list[str]] = {}
            for g, p in zip(rollout["group_ids"], rollout["prompts"], strict=True):
                groups.setdefault(g, []).append(p)
            # 2 prompts per rank and step, 4 samples each, every sample of a group on this rank
            assert sorted(len(v) for v in groups.values()) == [4, 4]
            assert all(len(set(v)) == 1 for v in groups.values())
    # The ranks saw different prompts at each step (the distributed sampler split them) ...
    for step in range(2):
        a, b = (set(r["rollouts"][step]["prompts"]) for r in ranks)
        assert a and b and not a & b
    # ... and DDP kept one policy: the same weights on both ranks after the updates.
    assert ranks[0]["checksum"] == ranks[1]["checksum"]


@pytest.mark.slow
def test_reinforce_pp_whitens_over_both_ranks(policy_export, tmp_path):  # noqa: F811
    ranks = run_ddp(policy_export, tmp_path, "reinforce_pp")
    for step in range(2):
        per_rank = [torch.tensor(r["rollouts"][step]["advantages"], dtype=torch.float64) for r in ranks]
        both = torch.cat(per_rank)
        # Global whitening: zero mean and unit (Bessel-corrected) variance over both ranks'
        # tokens together, not per rank.
        assert abs(float(both.mean())) < 1e-5
        assert abs(float(both.var(unbiased=True)) - 1.0) < 1e-4
        assert any(abs(float(a.mean())) > 1e-3 for a in per_rank)
    assert ranks[0]["checksum"] == ranks[1]["checksum"]


def test_rank_share_deals_a_sampler_in_turn_without_reshuffling():
    from rlhf_lightning.data.samplers import RankShare

    order = [7, 3, 9, 1, 4]
    shares = [list(RankShare(order, 2, r)) for r in range(2)]
    assert shares == [[7, 9, 4], [3, 1, 7]]  # padded with the start to a multiple of 2
    assert [len(RankShare(order, 2, r)) for r in range(2)] == [3, 3]
    with pytest.raises(ValueError, match="rank 2 out of range"):
        RankShare(order, 2, 2)


SFT_UNDER_DDP = """
import json, sys, lightning as L, torch
from rlhf_lightning.data.datamodules import SFTDataModule
from rlhf_lightning.systems.sft import SFTModule
tok, data, out = sys.argv[1:4]
seen = []
class Keep(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        seen.append(float(batch["loss_denominator"]))
dm = SFTDataModule(tokenizer=tok, train_file=data, val_fraction=0.0, batch_size=4)
m = SFTModule(model_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2}, tokenizer=tok)
t = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, callbacks=[Keep()], logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
t.fit(m, datamodule=dm)
json.dump(seen, open(f"{out}/rank{t.global_rank}.json", "w"))
"""


@pytest.mark.slow
def test_sft_token_windows_survive_ddp(tokenizer_dir, tmp_path):
    """Lightning's own wrapper reshuffled our sampler under DDP, so a micro-batch spanned two
    accumulation windows and SFT failed on any distributed strategy (GPU check, FSDP)."""
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"The movie {i} was", "response": " fine." * (1 + i % 4)}) + "\n"
                            for i in range(32)))  # fmt: skip
    script = tmp_path / "sft_ddp.py"
    script.write_text(SFT_UNDER_DDP)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), tokenizer_dir, str(data), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(per_rank[0]) == 3 and per_rank[0] == per_rank[1]  # both ranks divide by the same window's tokens
