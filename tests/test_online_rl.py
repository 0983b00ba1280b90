"""Critic-free online RL (GRPO, RLOO, REINFORCE++) on the shared engine: groups, estimators, no-signal updates."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from rlhf_lightning import advantages as adv
from rlhf_lightning.data.datamodules import PromptDataModule
from rlhf_lightning.generation import SamplingConfig
from rlhf_lightning.models import load_causal_lm, save_hf
from rlhf_lightning.rl.rewards import RewardFunctionSpec
from rlhf_lightning.systems.online_rl import OnlineRLModule
from tests.conftest import quiet_trainer

PROMPTS = ["The movie was", "I hated this film", "Review: a fine story", "The acting was"]


def constant_reward(prompts, responses):
    return [1.0] * len(responses)


def length_reward(prompts, responses):
    return [float(len(r.split())) for r in responses]


@pytest.fixture(scope="module")
def policy_export(tmp_path_factory, tokenizer, tokenizer_dir):
    from tests.conftest import TINY_MODEL_CONFIG

    root = tmp_path_factory.mktemp("online_rl")
    torch.manual_seed(0)
    save_hf(load_causal_lm(None, tokenizer, model_config=dict(TINY_MODEL_CONFIG)), tokenizer, root / "sft")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS * 2))
    return {"sft": str(root / "sft"), "prompts": str(prompts), "tokenizer": tokenizer_dir}


def make(exports, reward="length_reward", **kw):
    kw.setdefault("sampling", SamplingConfig(max_new_tokens=6))
    # No weight decay: with zero advantages nothing but AdamW's decay would move the weights.
    kw.setdefault("optimizer", lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0))
    defaults = dict(
        stage="grpo",
        estimator="grpo",
        num_samples=4,
        kl_in_loss=True,
        kl_estimator="k3",
        init_kl_coef=0.04,
        kl_target=None,
        whiten_advantages=False,
        ppo_epochs=1,
        loss_aggregation="seq_mean_token_mean",
        missing_eos_penalty=None,
    )
    return OnlineRLModule(
        model=exports["sft"],
        tokenizer=exports["tokenizer"],
        reward_functions=[RewardFunctionSpec(f"{__name__}:{reward}")],
        **{**defaults, **kw},
    )


def data(exports, batch_size=2):
    dm = PromptDataModule(
        tokenizer=exports["tokenizer"],
        train_file=exports["prompts"],
        val_fraction=0.0,
        batch_size=batch_size,
        max_prompt_length=16,
    )
    dm.setup("fit")
    return dm


def test_samples_of_a_prompt_share_it_and_its_group(policy_export):
    L.seed_everything(0)
    module = make(policy_export)
    module.configure_model()
    batch = next(iter(data(policy_export, batch_size=3).train_dataloader()))
    r, stats = module.collect_rollout(batch)
    assert r.batch_size == 12 and r.group_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for g in range(3):
        rows = r.group_ids == g
        assert (r.query_ids[rows] == r.query_ids[rows][0]).all()  # the same prompt, repeated
        assert len(set(r.prompts[i] for i in rows.nonzero().flatten().tolist())) == 1
    assert r.scores.tolist() == [float(len(t.split())) for t in _texts(module, r)]  # the reward function's scores
    # The next batch gets new group ids: groups stay distinct when batches share a buffer.
    r2, _ = module.collect_rollout(batch)
    assert r2.group_ids.min().item() == 3


def _texts(module, r):
    from rlhf_lightning.generation import decode_responses

    gen = r.generation()
    gen.ended = r.response_ids.eq(module.tokenizer.eos_token_id).any(-1)
    return decode_responses(module.tokenizer, gen)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_group_estimators_broadcast_the_maths(policy_export, estimator):
    L.seed_everything(0)
    module = make(policy_export, estimator=estimator, kl_in_loss=True)
    module.configure_model()
    r, _ = module.collect_rollout(next(iter(data(policy_export).train_dataloader())))
    module.compute_advantages(r)
    seq = adv.ESTIMATORS[estimator](r.scores, r.group_ids)  # KL in the loss: the scores alone
    torch.testing.assert_close(r.advantages, seq[:, None] * r.response_mask)
    assert r.returns is None and r.values is None  # no critic


def test_kl_in_the_reward_of_a_group_estimator_is_per_sequence(policy_export):
    L.seed_everything(0)
    module = make(policy_export, estimator="rloo", kl_in_loss=False, kl_estimator="k1", init_kl_coef=0.5)
    module.configure_model()
    r, _ = module.collect_rollout(next(iter(data(policy_export).train_dataloader())))
    r.logprobs = r.ref_logprobs + 0.1 * r.response_mask  # k1 = 0.1 on every real token
    module.compute_advantages(r)
    penalised = r.scores - 0.5 * 0.1 * r.response_mask.sum(-1)  # score - coef * sum_t kl_t
    torch.testing.assert_close(r.advantages, adv.rloo_advantages(penalised, r.group_ids)[:, None] * r.response_mask)


def test_equal_rewards_make_no_update(policy_export, tmp_path):
    # Every group's scores are equal: advantages are 0, and at ratio 1 the k3 KL term has zero
    # gradient (d/dr (e^r - 1 - r) = 0 at r = 0), so the policy must not move at all.
    L.seed_everything(0)
    module = make(policy_export, reward="constant_reward")
    module.configure_model()
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    quiet_trainer(tmp_path, max_steps=1).fit(module, datamodule=data(policy_export))
    assert all(torch.equal(before[k], v) for k, v in module.policy.state_dict().items())
    # The same run with scores that differ does move it.
    L.seed_everything(0)
    moving = make(policy_export)
    quiet_trainer(tmp_path, max_steps=1).fit(moving, datamodule=data(policy_export))
    assert any(not torch.equal(before[k], v) for k, v in moving.policy.state_dict().items())


def test_dynamic_sampling_drops_groups_without_signal(policy_export, tmp_path):
    L.seed_everything(0)
    module = make(policy_export, reward="constant_reward", dynamic_sampling=True)
    logged = {}

    class Keep(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    # No optimizer step is taken, so the run is bounded by batches, not steps.
    quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=1, callbacks=[Keep()]).fit(
        module, datamodule=data(policy_export)
    )
    assert module.global_step == 0
    assert logged["grpo/groups_dropped"] == 1.0  # every group had equal scores
    assert "grpo/policy_loss" not in logged  # nothing left to learn from


def test_one_sample_per_prompt_is_an_error_for_group_estimators(policy_export):
    with pytest.raises(ValueError, match="set num_samples >= 2"):
        make(policy_export, num_samples=1)


def test_reinforce_pp_whitens_returns_over_the_batch(policy_export):
    L.seed_everything(0)
    module = make(
        policy_export,
        stage="reinforce_pp",
        estimator="reinforce_pp",
        num_samples=1,
        kl_in_loss=False,
        kl_estimator="k1",
        init_kl_coef=0.05,
        loss_aggregation="token_mean",
    )
    module.configure_model()
    r, _ = module.collect_rollout(next(iter(data(policy_export, batch_size=4).train_dataloader())))
    module.compute_advantages(r)
    rewards = adv.kl_penalized_rewards(r.scores, r.logprobs, r.ref_logprobs, r.response_mask, 0.05, "k1")
    expected, returns = adv.reinforce_pp_advantages(rewards, r.response_mask, 1.0)
    torch.testing.assert_close(r.advantages, expected)
    torch.testing.assert_close(r.returns, returns)
    from rlhf_lightning.logprobs import masked_mean

    assert abs(masked_mean(r.advantages, r.response_mask).item()) < 1e-5  # whitened over all tokens of the batch


def test_overlong_penalty_applies_to_a_reward_function(policy_export):
    """Constant reward 1: each score is 1 minus half the soft penalty of its response's length."""
    L.seed_everything(0)
    budget, buffer = 6, 3
    module = make(
        policy_export,
        reward="constant_reward",
        sampling=SamplingConfig(max_new_tokens=budget),
        overlong_buffer=buffer,
        overlong_penalty_factor=0.5,
    )
    module.configure_model()
    r, _ = module.engine.collect(next(iter(data(policy_export).train_dataloader())))
    lengths = r.response_mask.sum(-1)
    expected = 1.0 - 0.5 * ((lengths.float() - (budget - buffer)) / buffer).clamp(0, 1)
    assert torch.allclose(r.scores, expected)
    assert (lengths > budget - buffer).any()  # the penalty was exercised


def test_overlong_buffer_larger_than_the_budget_is_an_error(policy_export):
    with pytest.raises(ValueError, match="overlong buffer"):
        make(policy_export, sampling=SamplingConfig(max_new_tokens=6), overlong_buffer=7)
