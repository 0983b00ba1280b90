"""Mixed precision on CPU: bf16 steps of every stage match fp32 within a stated tolerance, and the
log-probs, losses, advantages and KL stay float32 whatever the model computes in.

Tolerance: bf16 keeps 8 bits of mantissa (relative rounding 2^-9 ~ 2e-3 per operation). On these
two-layer models the first-step losses differ by at most ~1e-3 relative (measured: SFT 2e-5,
reward 3e-5, DPO 7e-4; bf16-true SFT 1.5e-5), so ``rtol=1e-2`` leaves room for other CPUs
while still catching a loss computed in bf16 end to end or a wrong upcast.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from rlhf_lightning.data.datamodules import PromptDataModule, SFTDataModule
from rlhf_lightning.generation import SamplingConfig
from rlhf_lightning.models import load_causal_lm, save_hf
from rlhf_lightning.rl.rewards import RewardFunctionSpec
from rlhf_lightning.systems.dpo import DPOModule
from rlhf_lightning.systems.online_rl import OnlineRLModule
from rlhf_lightning.systems.reward import RewardModule
from rlhf_lightning.systems.sft import SFTModule
from tests.conftest import TINY_MODEL_CONFIG, quiet_trainer
from tests.test_lora import LORA, files, preference_data  # noqa: F401  (files is a fixture)

MIXED_RTOL = 1e-2
TRUE_RTOL = 1e-2


class FirstLoss(L.Callback):
    def __init__(self):
        self.loss: torch.Tensor | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.loss is None:
            self.loss = outputs["loss"].detach()


def first_loss(make_module, datamodule, tmp_path, precision: str) -> torch.Tensor:
    L.seed_everything(0)
    grab = FirstLoss()
    quiet_trainer(tmp_path / precision, max_steps=1, precision=precision, callbacks=[grab]).fit(
        make_module(), datamodule=datamodule()
    )
    assert grab.loss.dtype == torch.float32, f"{precision}: the loss is {grab.loss.dtype}"
    return grab.loss


@pytest.fixture(scope="module")
def other_export(files):  # noqa: F811
    """A second tiny policy: a DPO reference that differs from the policy (the step-0 loss is not log 2)."""
    from rlhf_lightning.models import load_tokenizer

    tok = load_tokenizer(files["tokenizer"])
    torch.manual_seed(1)
    path = files["root"] / "other"
    save_hf(load_causal_lm(None, tok, model_config=dict(TINY_MODEL_CONFIG)), tok, path)
    return str(path)


def sft_data(files):  # noqa: F811
    return SFTDataModule(tokenizer=files["tokenizer"], train_file=files["sft_data"], val_fraction=0.0, batch_size=4)


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_sft_bf16_mixed_matches_fp32(files, tmp_path, lora):  # noqa: F811
    def make():
        return SFTModule(model=files["sft"], lora=lora)

    ref = first_loss(make, lambda: sft_data(files), tmp_path, "32-true")
    torch.testing.assert_close(
        first_loss(make, lambda: sft_data(files), tmp_path, "bf16-mixed"), ref, rtol=MIXED_RTOL, atol=0
    )


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_sft_bf16_true_matches_fp32(files, tmp_path, lora):  # noqa: F811
    def make():
        return SFTModule(model=files["sft"], lora=lora)

    ref = first_loss(make, lambda: sft_data(files), tmp_path, "32-true")
    torch.testing.assert_close(
        first_loss(make, lambda: sft_data(files), tmp_path, "bf16-true"), ref, rtol=TRUE_RTOL, atol=0
    )


def test_reward_bf16_mixed_matches_fp32(files, tmp_path):  # noqa: F811
    def make():
        torch.manual_seed(0)  # the score head is drawn at build time
        return RewardModule(model=files["sft"], tokenizer=files["tokenizer"])

    ref = first_loss(make, lambda: preference_data(files), tmp_path, "32-true")
    torch.testing.assert_close(
        first_loss(make, lambda: preference_data(files), tmp_path, "bf16-mixed"), ref, rtol=MIXED_RTOL, atol=0
    )


def test_dpo_bf16_mixed_matches_fp32(files, other_export, tmp_path):  # noqa: F811
    def make():
        return DPOModule(model=files["sft"], ref_model=other_export, tokenizer=files["tokenizer"])

    ref = first_loss(make, lambda: preference_data(files), tmp_path, "32-true")
    assert abs(ref.item() - 0.6931) > 1e-3  # policy != reference: a loss with something to compare
    torch.testing.assert_close(
        first_loss(make, lambda: preference_data(files), tmp_path, "bf16-mixed"), ref, rtol=MIXED_RTOL, atol=0
    )


def length_reward(prompts, responses):
    return [float(len(r.split())) for r in responses]


def test_grpo_bf16_mixed_rollout_is_fp32_and_loss_matches(files, tmp_path):  # noqa: F811
    L.seed_everything(0)
    module = OnlineRLModule(
        model=files["sft"],
        tokenizer=files["tokenizer"],
        reward_functions=[RewardFunctionSpec(f"{__name__}:length_reward")],
        stage="grpo",
        estimator="grpo",
        num_samples=4,
        kl_in_loss=True,
        kl_estimator="k3",
        kl_target=None,
        ppo_epochs=1,
        sampling=SamplingConfig(max_new_tokens=6),
    )
    dm = PromptDataModule(
        tokenizer=files["tokenizer"], train_file=files["prompts"], val_fraction=0.0, batch_size=2, max_prompt_length=16
    )
    dm.setup("fit")
    # A whole bf16-mixed iteration runs and logs finite numbers.
    trainer = quiet_trainer(tmp_path, max_steps=1, precision="bf16-mixed")
    trainer.fit(module, datamodule=dm)
    assert all(torch.isfinite(v).all() for k, v in trainer.callback_metrics.items() if k.startswith("grpo/"))

    # On one rollout collected under autocast: every tensor is fp32, and the loss matches fp32's.
    batch = next(iter(dm.train_dataloader()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rollout, _ = module.collect_rollout(batch)
    for name in ("logprobs", "ref_logprobs", "scores"):
        assert getattr(rollout, name).dtype == torch.float32, name
    module.compute_advantages(rollout)
    assert rollout.advantages.dtype == torch.float32
    # GRPO's first loss is ~0 (centred advantages, ratio 1, KL 0); raw scores as advantages
    # give a surrogate with a value to compare.
    rollout.advantages = rollout.scores[:, None].expand_as(rollout.response_mask).float()  # (B, A)
    results = {}
    for precision, enabled in (("fp32", False), ("bf16", True)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled), torch.no_grad():
            out, values = module.engine.policy_outputs(rollout, with_entropy=True)
            loss, _ = module.loss(rollout, out.logprobs, values)
        assert out.logprobs.dtype == out.entropy.dtype == loss.dtype == torch.float32
        results[precision] = (out.logprobs, out.entropy, loss)
    m = rollout.response_mask.bool()  # (B, A)
    for i, name in enumerate(("logprobs", "entropy")):
        torch.testing.assert_close(results["bf16"][i][m], results["fp32"][i][m], rtol=MIXED_RTOL, atol=0, msg=name)
    torch.testing.assert_close(results["bf16"][2], results["fp32"][2], rtol=MIXED_RTOL, atol=0)
    assert abs(results["fp32"][2].item()) > 0.1
