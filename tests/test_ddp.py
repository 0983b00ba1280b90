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
