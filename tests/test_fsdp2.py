"""SFT and GRPO under FSDP2 (ModelParallelStrategy, ``fully_shard``) on 2 CPU processes with gloo.

FSDP v1 refuses the CPU; FSDP2 runs on it, so sharding, sampling with sharded weights,
the gathered export and the update itself (equal to DDP's) are checked here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.test_online_rl import policy_export  # noqa: F401  (fixture)

SCRIPT = Path(__file__).parent / "scripts" / "fsdp2_stage.py"
PROMPTS = [f"{start} {end}" for start in ("The movie was", "I hated this film") for end in "abcd"]


def run(stage: str, model: str, tokenizer: str, data: Path, out_dir: Path, strategy: str) -> list[dict]:
    out_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(SCRIPT), stage, model, tokenizer, str(data), str(out_dir), strategy]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]


def check_fsdp2_run(stage: str, model: str, tokenizer: str, data: Path, tmp_path: Path) -> None:
    ranks = run(stage, model, tokenizer, data, tmp_path / "fsdp2", "fsdp2")
    assert [r["world_size"] for r in ranks] == [2, 2]
    for r in ranks:
        assert r["losses"] and all(math.isfinite(x) for x in r["losses"])
        assert r["sharded"] and r["local_numel"] < r["full_numel"]
        assert r["sampling_matches"]  # ranks sampled 3 and 8 tokens: no hang, the plain copy's tokens
    assert sum(r["local_numel"] for r in ranks) == ranks[0]["full_numel"]  # each weight split across the ranks
    # One model: the gathered weights are the same on both ranks, and training moved them.
    assert ranks[0]["after"] == ranks[1]["after"] != ranks[0]["before"]
    assert ranks[0]["export_equal"]  # the export is the gathered weights, exactly
    # The update is DDP's: with 2 ranks the mean of two gradients rounds the same either way.
    run(stage, model, tokenizer, data, tmp_path / "ddp", "ddp")
    sharded, ddp = (torch.load(tmp_path / d / "weights.pt") for d in ("fsdp2", "ddp"))
    assert sharded.keys() == ddp.keys() and all(torch.equal(sharded[k], ddp[k]) for k in ddp)
    # Plain transformers loads the export (no rlhf_lightning, no process group).
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp2" / "hf")
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in sharded.items())
    assert torch.isfinite(exported(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.slow
def test_sft_under_fsdp2_matches_ddp(tokenizer_dir, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"The movie {i} was", "response": " fine." * (1 + i % 4)}) + "\n"
                            for i in range(32)))  # fmt: skip
    check_fsdp2_run("sft", "", tokenizer_dir, data, tmp_path)


@pytest.mark.slow
def test_grpo_under_fsdp2_matches_ddp(policy_export, tmp_path):  # noqa: F811
    """Sampling, rollout log-probs and two updates per rollout (several forwards of the sharded
    policy in one manual-optimisation step: what FSDP v1 refused on a GPU)."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    check_fsdp2_run("grpo", policy_export["sft"], policy_export["tokenizer"], data, tmp_path)


def fake_mesh(data_parallel: int, tensor_parallel: int) -> dict:
    """``mesh[dim].size()`` as ModelParallelStrategy's device mesh answers it."""
    return {"data_parallel": SimpleNamespace(size=lambda: data_parallel),
            "tensor_parallel": SimpleNamespace(size=lambda: tensor_parallel)}  # fmt: skip


def test_fsdp2_refuses_what_it_would_not_synchronise(tokenizer_dir):
    from rlhf_lightning.systems.sft import SFTModule
    from tests.conftest import TINY_MODEL_CONFIG

    module = SFTModule(model_config=dict(TINY_MODEL_CONFIG), tokenizer=tokenizer_dir)
    module.build_models()
    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        module.shard_trainable(fake_mesh(1, 2))
    # A trainable model that is not called through a transformers forward would stay whole
    # on each rank with nothing averaging its gradients: refused before anything is sharded.
    module.head = torch.nn.Linear(2, 2)
    with pytest.raises(NotImplementedError, match=r"cannot shard head \(Linear\)"):
        module.shard_trainable(fake_mesh(2, 1))
    assert not any(type(m).__name__.startswith("FSDP") for m in module.modules())
