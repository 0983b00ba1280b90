"""The architecture matrix, training half: SFT, reward, DPO and PPO each run a step on every family.

Stages hand off as in the pipeline: SFT starts from a tiny random export of the
architecture, the reward model and DPO from the SFT export, PPO from the SFT and
reward exports. Each export must reload with plain ``transformers`` to exactly the
in-memory model. Heavier than ``tests/test_arch_matrix.py``: marked ``slow``.
"""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf_lightning.data.datamodules import PreferenceDataModule, PromptDataModule, SFTDataModule
from rlhf_lightning.generation import SamplingConfig
from rlhf_lightning.models import load_causal_lm, save_hf
from rlhf_lightning.systems.dpo import DPOModule
from rlhf_lightning.systems.ppo import PPOModule
from rlhf_lightning.systems.reward import RewardModule
from rlhf_lightning.systems.sft import SFTModule
from tests.arch_configs import ARCH_CONFIGS
from tests.conftest import quiet_trainer

PAIRS = [
    ("The movie was", " great and the acting was wonderful.", " boring and bad."),
    ("I hated this film,", " the plot was boring.", " the music was lovely!"),
    ("Review:", " a fine story with a few slow scenes.", " a terrible script."),
    ("A terrible script,", " weak actors and a dull ending.", " great."),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch_data")
    rows = {
        "sft": [{"prompt": p, "response": c} for p, c, _ in PAIRS],
        "pairs": [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS],
        "prompts": [{"prompt": p} for p, _, _ in PAIRS],
    }
    for name, records in rows.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {name: str(root / f"{name}.jsonl") for name in rows}


def data(cls, tokenizer_dir, path, **kw):
    dm = cls(tokenizer=tokenizer_dir, train_file=path, val_fraction=0.0, batch_size=2, max_prompt_length=16, **kw)
    dm.setup("fit")
    return dm


def fit_one_step(module, datamodule, tmp_path) -> dict[str, torch.Tensor]:
    """One optimizer step; returns the trainable weights before it (to check that they moved)."""
    module.configure_model()
    before = {k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad}
    quiet_trainer(tmp_path, max_steps=1).fit(module, datamodule=datamodule)
    return before


def assert_moved(module, before: dict[str, torch.Tensor], what: str) -> None:
    after = dict(module.named_parameters())
    assert any(not torch.equal(after[k], v) for k, v in before.items()), f"{what}: no trainable weight changed"
    assert all(torch.isfinite(after[k]).all() for k in before), f"{what}: non-finite weights"


def same_logits(model, export, ids) -> None:
    """The export, loaded by plain transformers, gives exactly the in-memory model's logits."""
    plain = AutoModelForCausalLM.from_pretrained(export).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCH_CONFIGS))
def test_every_stage_trains_a_step_and_exports(arch, tokenizer, tokenizer_dir, files, tmp_path):
    L.seed_everything(0)
    ids = torch.tensor([tokenizer("The movie was great and the acting was wonderful.").input_ids])
    base = tmp_path / "base"
    save_hf(load_causal_lm(None, tokenizer, model_config=dict(ARCH_CONFIGS[arch])), tokenizer, base)

    sft = SFTModule(model=str(base), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    before = fit_one_step(sft, data(SFTDataModule, tokenizer_dir, files["sft"], max_response_length=16), tmp_path)
    assert_moved(sft, before, f"{arch} SFT")
    sft.export_hf(tmp_path / "sft")
    same_logits(sft.policy, tmp_path / "sft", ids)

    pairs = data(PreferenceDataModule, tokenizer_dir, files["pairs"], max_response_length=16)
    rm = RewardModule(model=str(tmp_path / "sft"), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    before = fit_one_step(rm, pairs, tmp_path)
    assert_moved(rm, before, f"{arch} reward")
    rm.export_hf(tmp_path / "rm")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    rm.reward_model.eval()
    with torch.no_grad():
        score = rm.reward_model(ids, torch.ones_like(ids), normalize=False)  # (1,)
        torch.testing.assert_close(plain(input_ids=ids).logits.squeeze(-1), score, rtol=1e-6, atol=1e-6)

    dpo = DPOModule(model=str(tmp_path / "sft"), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    before = fit_one_step(dpo, pairs, tmp_path)
    assert_moved(dpo, before, f"{arch} DPO")

    ppo = PPOModule(
        model=str(tmp_path / "sft"),
        reward_model=str(tmp_path / "rm"),
        sampling=SamplingConfig(max_new_tokens=6, engine="auto"),
        ppo_epochs=1,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
    )
    before = fit_one_step(ppo, data(PromptDataModule, tokenizer_dir, files["prompts"], max_response_length=6), tmp_path)
    assert_moved(ppo, before, f"{arch} PPO")
    assert all(torch.isfinite(v).all() for s in ppo.learner.update_stats for v in s.values())
    ppo.export_hf(tmp_path / "ppo")
    same_logits(ppo.policy, tmp_path / "ppo", ids)
