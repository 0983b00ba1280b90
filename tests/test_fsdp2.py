"""SFT, reward, DPO, PPO (LoRA too) and GRPO under FSDP2 (ModelParallelStrategy, ``fully_shard``)
on 2 CPU processes with gloo.

FSDP v1 refuses the CPU; FSDP2 runs on it, so sharding, sampling with sharded weights,
the gathered export, the update itself (equal to DDP's) and the exact resume from a
sharded checkpoint are checked here. Each stage's uninterrupted run is shared by its tests.
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
from tests.test_ppo import exports  # noqa: F401  (fixture: an SFT export and a reward model beside it)

SCRIPT = Path(__file__).parent / "scripts" / "fsdp2_stage.py"
PROMPTS = [f"{start} {end}" for start in ("The movie was", "I hated this film") for end in "abcd"]
WORDS = ["great", "bad", "fine", "slow", "lovely", "dull"]


class Stage:
    """A stage run by ``scripts/fsdp2_stage.py`` on 2 processes, its runs in ``root``."""

    def __init__(self, name: str, model: str, tokenizer: str, data: Path, root: Path):
        self.name, self.model, self.tokenizer, self.data, self.root = name, model, tokenizer, data, root
        self._whole = None

    def run(self, out: str, strategy: str = "fsdp2", phase: str = "whole") -> list[dict]:
        """Each rank's record of a run in ``root/out`` (``phase``: see the script)."""
        out_dir = self.root / out
        out_dir.mkdir(parents=True, exist_ok=True)  # resume: where the cut run left its checkpoints
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, str(SCRIPT), self.name, self.model, self.tokenizer, str(self.data), str(out_dir)]
        proc = subprocess.run([*cmd, strategy, phase], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]

    def weights(self, out: str) -> dict[str, torch.Tensor]:
        return torch.load(self.root / out / "weights.pt")

    @property
    def whole(self) -> list[dict]:
        """The uninterrupted FSDP2 run (four steps), run once for the tests that compare with it."""
        if self._whole is None:
            self._whole = self.run("fsdp2")
        return self._whole


@pytest.fixture(scope="module")
def sft(tokenizer_dir, tmp_path_factory) -> Stage:
    root = tmp_path_factory.mktemp("fsdp2_sft")
    data = root / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"The movie {i} was", "response": " fine." * (1 + i % 4)}) + "\n"
                            for i in range(32)))  # fmt: skip
    return Stage("sft", "", tokenizer_dir, data, root)


def write_pairs(path: Path, offset: int) -> Path:
    """16 preference pairs; the rejected word is ``offset`` places after the chosen one in WORDS."""
    path.write_text("".join(json.dumps({"prompt": f"Review {i}:", "chosen": f" {WORDS[i % 6]} film.",
                                        "rejected": f" {WORDS[(i + offset) % 6]} plot."}) + "\n"
                            for i in range(16)))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def dpo(policy_export, tmp_path_factory) -> Stage:  # noqa: F811
    root = tmp_path_factory.mktemp("fsdp2_dpo")
    data = write_pairs(root / "pairs.jsonl", offset=2)
    return Stage("dpo", policy_export["sft"], policy_export["tokenizer"], data, root)


def prompt_stage(name: str, files: dict, tmp_path_factory) -> Stage:
    """An online-RL stage on PROMPTS, from ``files``' SFT policy (and the reward model beside it)."""
    root = tmp_path_factory.mktemp(f"fsdp2_{name}")
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return Stage(name, files["sft"], files["tokenizer"], data, root)


@pytest.fixture(scope="module")
def grpo(policy_export, tmp_path_factory) -> Stage:  # noqa: F811
    return prompt_stage("grpo", policy_export, tmp_path_factory)


@pytest.fixture(scope="module")
def reward(policy_export, tmp_path_factory) -> Stage:  # noqa: F811
    root = tmp_path_factory.mktemp("fsdp2_reward")
    data = write_pairs(root / "pairs.jsonl", offset=3)
    (root / "sft.jsonl").write_text("".join(json.dumps({"prompt": f"Review {i}:", "response": f" {w} film."}) + "\n"
                                            for i, w in enumerate(WORDS)))  # fmt: skip
    return Stage("reward_lora", policy_export["sft"], policy_export["tokenizer"], data, root)


@pytest.fixture(scope="module")
def ppo(exports, tmp_path_factory) -> Stage:  # noqa: F811
    return prompt_stage("ppo", exports, tmp_path_factory)


def check_matches_ddp(stage: Stage, atol: float = 0.0) -> None:
    ranks = stage.whole
    assert [r["world_size"] for r in ranks] == [2, 2]
    for r in ranks:
        assert r["losses"] and all(math.isfinite(x) for x in r["losses"])
        assert r["sharded"] and r["local_numel"] < r["full_numel"]
        assert r["sampling_matches"]  # ranks sampled 3 and 8 tokens: no hang, the plain copy's tokens
        assert r["chunked"]  # the sharded policy's log-probs never built the full logits
        assert r["frozen_sharded"]  # reference and reward model: no copy whole on every rank
    assert sum(r["local_numel"] for r in ranks) == ranks[0]["full_numel"]  # each weight split across the ranks
    # One model: the gathered weights are the same on both ranks, and training moved them.
    assert ranks[0]["after"] == ranks[1]["after"] != ranks[0]["before"]
    assert ranks[0]["export_equal"]  # the export is the gathered weights, exactly (LoRA: merged)
    assert ranks[0]["export_outputs_match"]  # plain transformers gives the sharded model's outputs
    assert ranks[0]["generation_config_kept"] and ranks[0]["normalization_exported"]
    # The update is DDP's: with 2 ranks the mean of two gradients rounds the same either way.
    stage.run("ddp", "ddp")
    sharded, ddp = stage.weights("fsdp2"), stage.weights("ddp")
    assert sharded.keys() == ddp.keys() and all(torch.allclose(sharded[k], ddp[k], rtol=0, atol=atol) for k in ddp)
    # Plain transformers loads the export (no rlhf_lightning, no process group).
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    reward = stage.name.startswith("reward")
    auto, prefix = (AutoModelForSequenceClassification, "reward_model.model.") if reward else (
        AutoModelForCausalLM, "policy.")  # fmt: skip
    exported = auto.from_pretrained(stage.root / "fsdp2" / "hf").state_dict()
    if "lora" not in stage.name:  # a LoRA export is merged: its outputs were compared instead
        assert all(torch.equal(exported[k[len(prefix) :]], v) for k, v in sharded.items() if k.startswith(prefix))


def check_resumes_exactly(stage: Stage) -> None:
    """Stopped after two of four steps (mid-epoch) and resumed from ``last.ckpt``, a sharded checkpoint:
    each rank's losses and the final weights are the uninterrupted run's, bit for bit (RNG streams,
    data position, Adam moments and, for GRPO, the adaptive KL coefficient all taken up)."""
    whole = stage.whole
    cut = stage.run("cut", phase="cut")
    ckpt = stage.root / "cut" / "ckpt" / "last.ckpt"
    assert sorted(f.name for f in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one shard file a rank
    resumed = stage.run("cut", phase="resume")
    for w, c, r in zip(whole, cut, resumed, strict=True):  # each rank
        k = len(c["losses"])
        assert 0 < k < len(w["losses"]) and c["losses"] == w["losses"][:k] and r["losses"] == w["losses"][k:]
    uninterrupted, continued = stage.weights("fsdp2"), stage.weights("cut")
    assert uninterrupted.keys() == continued.keys()
    assert all(torch.equal(uninterrupted[k], continued[k]) for k in uninterrupted)


@pytest.mark.slow
def test_sft_under_fsdp2_matches_ddp(sft):
    check_matches_ddp(sft)


@pytest.mark.slow
def test_dpo_under_fsdp2_matches_ddp(dpo):
    """The policy sharded, and the reference (a frozen copy of the export) as well."""
    check_matches_ddp(dpo)
    assert dpo.whole[0]["frozen"] == ["ref_policy"]


@pytest.mark.slow
def test_dpo_precomputed_reference_under_ddp(dpo):
    """Each rank scores its share of the pairs with the reference and the ranks exchange them: the
    cache covers every pair on both ranks (it used to hold one rank's share and fail), and training
    from it gives the weights of DPO with the reference run on every batch."""
    cached = Stage("dpo_cached", dpo.model, dpo.tokenizer, dpo.data, dpo.root)
    ranks = cached.run("ddp_cached", "ddp")
    assert all(r["losses"] and all(math.isfinite(x) for x in r["losses"]) for r in ranks)
    if not (dpo.root / "ddp" / "weights.pt").exists():
        dpo.run("ddp", "ddp")
    live, precomputed = dpo.weights("ddp"), cached.weights("ddp_cached")
    assert live.keys() == precomputed.keys()
    assert all(torch.allclose(live[k], precomputed[k], rtol=0, atol=1e-6) for k in live)


@pytest.mark.slow
def test_dpo_precomputed_reference_under_fsdp2_resumes(dpo):
    """Under FSDP2 the reference is freed once its log-probs are cached, so the sharded checkpoint
    lacks it; a resumed run builds it again from its export (the checkpoint's loader is not strict)
    and caches again. Stopped after two steps and resumed, the run ends at the weights of DPO with
    the reference run on every batch, and each rank's losses are that run's."""
    cached = Stage("dpo_cached", dpo.model, dpo.tokenizer, dpo.data, dpo.root)
    cut = cached.run("fsdp2_cached", phase="cut")
    resumed = cached.run("fsdp2_cached", phase="resume")
    for live, c, r in zip(dpo.whole, cut, resumed, strict=True):  # each rank, against the live FSDP2 run
        assert c["losses"] + r["losses"] == pytest.approx(live["losses"], abs=1e-5) and c["losses"] and r["losses"]
    if not (dpo.root / "ddp" / "weights.pt").exists():
        dpo.run("ddp", "ddp")
    live, precomputed = dpo.weights("ddp"), cached.weights("fsdp2_cached")
    assert live.keys() == precomputed.keys()
    assert all(torch.allclose(live[k], precomputed[k], rtol=0, atol=1e-6) for k in live)


@pytest.mark.slow
def test_grpo_under_fsdp2_matches_ddp(grpo):
    """Sampling, rollout log-probs and two updates per rollout (several forwards of the sharded
    policy in one manual-optimisation step: what FSDP v1 refused on a GPU)."""
    check_matches_ddp(grpo)


@pytest.mark.slow
def test_reward_model_with_lora_under_fsdp2_matches_ddp(reward):
    """The RewardModel wrapper is the FSDP2 root (its forward calls the backbone and the score
    head directly), with LoRA on the backbone and the score head trained in full; the
    normalisation scores with it on every rank; the export is its ``*ForSequenceClassification``,
    gathered out of the wrapper with the adapter rebuilt, then merged."""
    check_matches_ddp(reward)


@pytest.mark.slow
def test_ppo_under_fsdp2_matches_ddp(ppo):
    """Policy and separate critic sharded (the critic called through ``values``, registered as
    an FSDP2 forward), and the frozen reference and reward model (gathered for each forward,
    the root resharded after it)."""
    check_matches_ddp(ppo)
    assert ppo.whole[0]["frozen"] == ["ref_policy", "reward_model"]
    assert {k.split(".")[0] for k in ppo.weights("fsdp2")} == {"policy", "critic"}


@pytest.mark.slow
def test_ppo_under_fsdp2_resumes_exactly(ppo):
    """Resume from a sharded checkpoint: policy and critic shards, both optimizer groups, the
    adaptive KL coefficient, RNG streams, and the frozen reference and reward model, which this
    checkpoint keeps (torch.distributed.checkpoint asks for every weight). SFT, DPO and GRPO
    resume through the same sharded-checkpoint path."""
    check_resumes_exactly(ppo)


@pytest.mark.slow
def test_ppo_with_lora_under_fsdp2_matches_ddp(ppo):
    """LoRA adapters on the sharded policy (frozen base weights sharded with them), the
    reference the policy with its adapter off, the critic a value head on the policy's hidden
    states (sharded on its own); the merged export gives the sharded policy's outputs.
    Gradient clipping is on: the norm of sharded gradients is summed in
    another order than DDP's, so the weights agree to an ulp rather than bit for bit."""
    check_matches_ddp(Stage("ppo_lora", ppo.model, ppo.tokenizer, ppo.data, ppo.root / "lora"), atol=1e-6)


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
        module.shard_models(fake_mesh(1, 2))
    # A trainable model that is not called through a transformers forward would stay whole
    # on each rank with nothing averaging its gradients: refused before anything is sharded.
    module.head = torch.nn.Linear(2, 2)
    with pytest.raises(NotImplementedError, match=r"cannot shard head \(Linear\)"):
        module.shard_models(fake_mesh(2, 1))
    assert not any(type(m).__name__.startswith("FSDP") for m in module.modules())
