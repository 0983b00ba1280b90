"""PPO system: rollout invariants, frozen models, EOS handling, checkpoint/resume."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from rlhf_lightning.data.datamodules import PromptDataModule
from rlhf_lightning.generation import SamplingConfig
from rlhf_lightning.models import build_reward_model, load_causal_lm, save_hf
from rlhf_lightning.rl.critics import ValueHeadCritic
from rlhf_lightning.systems.ppo import PPOModule
from tests.conftest import quiet_trainer

PROMPTS = [
    "The movie was",
    "I hated this film",
    "Review: a fine story",
    "My thoughts on this movie:",
    "The music was",
    "A terrible script",
    "The acting was",
    "This film is",
]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer, tokenizer_dir):
    from tests.conftest import TINY_MODEL_CONFIG

    root = tmp_path_factory.mktemp("ppo_exports")
    torch.manual_seed(0)
    policy = load_causal_lm(None, tokenizer, model_config=dict(TINY_MODEL_CONFIG))
    save_hf(policy, tokenizer, root / "sft")
    rm = build_reward_model(str(root / "sft"), tokenizer)
    rm.save_pretrained(root / "rm", tokenizer)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS * 2))
    return {"sft": str(root / "sft"), "rm": str(root / "rm"), "prompts": str(prompts), "tokenizer": tokenizer_dir}


def make(exports, **kw):
    kw.setdefault("sampling", SamplingConfig(max_new_tokens=8))
    return PPOModule(model=exports["sft"], reward_model=exports["rm"], tokenizer=exports["tokenizer"], **kw)


def make_data(exports, batch_size=4):
    dm = PromptDataModule(
        tokenizer=exports["tokenizer"],
        train_file=exports["prompts"],
        val_fraction=0.0,
        batch_size=batch_size,
        max_prompt_length=16,
        eval_file=exports["prompts"],
    )
    dm.setup("fit")
    return dm


def trainer(tmp_path, **kw):
    return quiet_trainer(tmp_path, **{"max_steps": 4, **kw})


def bias_eos(module, bias: float) -> None:
    """Give the policy's LM head a bias on EOS, to make stopping likely, certain or impossible."""
    old = module.policy.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[module.tokenizer.eos_token_id] = bias
    module.policy.lm_head = head


def test_first_minibatch_ratio_exactly_one(exports, tmp_path):
    L.seed_everything(0)
    module = make(exports, ppo_epochs=2, minibatch_size=2)
    dm = make_data(exports)
    trainer(tmp_path, max_steps=4).fit(module, datamodule=dm)  # one iteration: 2 epochs x 2 minibatches
    first = module.learner.update_stats[0]
    assert first["ratio_mean"].item() == 1.0
    assert first["approx_kl"].item() == 0.0
    assert first["clipfrac"].item() == 0.0
    # Later minibatches see an updated policy.
    assert any(s["approx_kl"].item() > 0 for s in module.learner.update_stats[1:])


def test_frozen_models_unchanged_trainable_changed(exports, tmp_path):
    L.seed_everything(0)
    module = make(exports, ppo_epochs=1)
    dm = make_data(exports)
    module.configure_model()
    before = {
        name: {k: v.clone() for k, v in getattr(module, name).state_dict().items()}
        for name in ("policy", "ref_policy", "reward_model", "critic")
    }
    trainer(tmp_path, max_steps=2).fit(module, datamodule=dm)
    for name, changed in (("policy", True), ("critic", True), ("ref_policy", False), ("reward_model", False)):
        after = getattr(module, name).state_dict()
        same = all(torch.equal(before[name][k], after[k]) for k in after)
        assert same != changed, f"{name} should {'change' if changed else 'stay frozen'}"
    assert not any(p.requires_grad for p in module.ref_policy.parameters())
    assert not module.reward_model.training and not module.ref_policy.training
    opt_params = {id(p) for g in module.optimizers().optimizer.param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in module.ref_policy.parameters()}
    assert not opt_params & {id(p) for p in module.reward_model.parameters()}


def test_rollout_masks_after_eos_and_penalises_missing_eos(exports):
    L.seed_everything(0)
    module = make(exports, missing_eos_penalty=-3.0, sampling=SamplingConfig(max_new_tokens=6))
    module.configure_model()
    dm = make_data(exports, batch_size=8)
    batch = next(iter(dm.train_dataloader()))
    bias_eos(module, 4.0)  # an untrained tiny model rarely stops by itself; make some rows stop
    eos = module.tokenizer.eos_token_id
    r, stats = module.collect_rollout(batch)
    ended = (r.response_ids == eos).any(-1)
    raw = module.reward_model(
        torch.cat([r.query_ids, r.response_ids], 1), torch.cat([r.query_mask, r.response_mask], 1)
    )
    assert 0 < ended.sum() < len(ended)  # both cases present
    assert torch.allclose(r.scores[~ended], torch.full_like(r.scores[~ended], -3.0))
    assert torch.allclose(r.scores[ended], raw[ended])
    # Nothing after the first EOS is real.
    for ids, mask in zip(r.response_ids.tolist(), r.response_mask.tolist(), strict=True):
        if eos in ids:
            k = ids.index(eos)
            assert mask[: k + 1] == [1] * (k + 1) and not any(mask[k + 1 :])
            assert all(t == module.tokenizer.pad_token_id for t in ids[k + 1 :])
    assert stats["eos_rate"].item() == pytest.approx(ended.float().mean().item())


def test_eos_penalty_applies_when_no_eos(exports):
    L.seed_everything(0)
    module = make(exports, missing_eos_penalty=-2.0, sampling=SamplingConfig(max_new_tokens=3))
    module.configure_model()
    eos = module.tokenizer.eos_token_id
    batch = next(iter(make_data(exports, 8).train_dataloader()))
    bias_eos(module, -1e4)  # EOS impossible: every row is penalised
    r, _ = module.collect_rollout(batch)
    assert not (r.response_ids == eos).any() and r.response_mask.all()
    assert torch.all(r.scores == -2.0)
    bias_eos(module, 1e4)  # EOS certain: a one-token response keeps its reward-model score
    r, stats = module.collect_rollout(batch)
    assert r.response_mask.sum(-1).tolist() == [1] * 8 and stats["eos_rate"].item() == 1.0
    assert torch.all(r.scores != -2.0)


def test_shared_value_head_runs_and_starts_at_zero(exports, tmp_path):
    L.seed_everything(0)
    module = make(exports, shared_value_head=True, ppo_epochs=1)
    module.configure_model()
    assert isinstance(module.critic, ValueHeadCritic)  # no second model
    batch = next(iter(make_data(exports).train_dataloader()))
    r, _ = module.collect_rollout(batch)
    assert torch.all(r.values == 0)  # zero-initialised head
    trainer(tmp_path, max_steps=2).fit(module, datamodule=make_data(exports))
    assert module.critic.summary.weight.abs().sum() > 0


def test_resume_restores_kl_coef_and_step(exports, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0)
    ckpt_dir = tmp_path / "ckpt"
    module = make(exports, ppo_epochs=1, kl_target=0.01, kl_horizon=10)
    t = trainer(
        tmp_path,
        max_steps=3,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1)],
    )
    t.fit(module, datamodule=make_data(exports))
    kl_coef, iteration = module.kl_ctl.value, module.iteration
    assert kl_coef != 0.05 and iteration == 3
    ckpt = next(ckpt_dir.glob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=False)
    assert not any(k.startswith(("ref_policy.", "reward_model.")) for k in saved["state_dict"])
    seen = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update(kl=pl_module.kl_ctl.value, iteration=pl_module.iteration, step=trainer.global_step)

    resumed = make(exports, ppo_epochs=1, kl_target=0.01, kl_horizon=10)
    t2 = trainer(tmp_path, max_steps=5, callbacks=[Probe()])
    t2.fit(resumed, datamodule=make_data(exports), ckpt_path=str(ckpt))
    assert seen == {"kl": kl_coef, "iteration": 3, "step": 3}  # continues where it stopped
    assert resumed.iteration == 5 and t2.global_step == 5
    assert resumed.kl_ctl.value != kl_coef  # and the controller kept adapting


@pytest.mark.slow
def test_ppo_ddp_two_processes_on_cpu(demo_workspace, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    config = Path(__file__).resolve().parent.parent / "configs" / "ppo.yaml"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "rlhf_lightning.cli",
        "fit",
        "-c",
        str(config),
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=8",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--data.init_args.batch_size=4",
        "--model.init_args.minibatch_size=2",
        "--model.init_args.sampling.max_new_tokens=6",
        "--data.init_args.val_batch_size=8",
    ]
    proc = subprocess.run(cmd, cwd=demo_workspace, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = (tmp_path / "logs/metrics.csv").read_text()  # everything under default_root_dir
    assert "ppo/kl_coef" in metrics and "eval/gold_reward" in metrics


def test_critic_starts_on_the_normalised_reward_scale(exports, tmp_path):
    from rlhf_lightning.models import last_token_index, load_reward_model

    rm = load_reward_model(exports["rm"])
    rm.set_normalization(gain=0.5, bias=-2.0)  # as the reward stage's normalisation callback would
    rm.save_pretrained(tmp_path / "rm", load_tokenizer_for(exports))
    module = make({**exports, "rm": str(tmp_path / "rm")})
    module.configure_model()
    batch = next(iter(make_data(exports, 8).train_dataloader()))
    r, _ = module.collect_rollout(batch)
    ids = torch.cat([r.query_ids, r.response_ids], 1)
    mask = torch.cat([r.query_mask, r.response_mask], 1)
    with torch.no_grad():
        values = module.critic.token_values(ids, mask)  # (B, T)
        at_end = values.gather(1, last_token_index(mask)[:, None]).squeeze(1)
        raw = module.reward_model(ids, mask, normalize=False)
    # The critic's value after the last token equals the normalised score the policy is given.
    torch.testing.assert_close(at_end, module.reward_model(ids, mask))
    torch.testing.assert_close(at_end, 0.5 * raw - 2.0)


def load_tokenizer_for(exports):
    from rlhf_lightning.models import load_tokenizer

    return load_tokenizer(exports["tokenizer"])


def test_micro_batch_accumulation_matches_full_minibatch(exports):
    # Ragged responses: token weighting, not a plain mean of micro-batch means, makes 1x8 = 4x2 = 8x1.
    L.seed_everything(0)
    module = make(exports, sampling=SamplingConfig(max_new_tokens=8))
    module.configure_model()
    bias_eos(module, 3.5)  # some responses stop early: ragged lengths
    batch = next(iter(make_data(exports, 8).train_dataloader()))
    r, _ = module.collect_rollout(batch)
    assert len(set(r.response_mask.sum(-1).tolist())) > 1
    module.compute_advantages(r)
    r.logprobs = r.logprobs - 0.1 * torch.randn_like(r.logprobs)  # off-policy, so ratios and clipping matter
    params = [p for p in module.parameters() if p.requires_grad]
    grads = []
    for micro in (8, 2, 1):
        module.zero_grad(set_to_none=True)
        module.learner.accumulate_gradients(r, micro, backward=lambda loss: loss.backward())
        grads.append([p.grad.clone() for p in params])
    for other in grads[1:]:
        for a, b in zip(grads[0], other, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("shared_value_head", [False, True])
def test_reusing_the_first_learning_forward_changes_nothing(exports, tmp_path, shared_value_head):
    # One minibatch, one micro-batch: the rollout-time log-probs/values come from the first
    # update's forward instead of a separate pass. Weights and statistics must not change.
    results = []
    for reuse in (True, False):
        L.seed_everything(0)
        module = make(exports, ppo_epochs=3, reuse_rollout_forward=reuse, shared_value_head=shared_value_head)
        dm = make_data(exports, batch_size=8)
        assert module.reuses_rollout_forward(8) == reuse
        logged = {}

        class Keep(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                # B023: the callback runs within this loop pass, on this pass's `logged`.
                logged.update({k: v.clone() for k, v in trainer.callback_metrics.items() if k.startswith("ppo/")})  # noqa: B023

        trainer(tmp_path, max_steps=6, callbacks=[Keep()]).fit(module, datamodule=dm)  # 2 iterations x 3 epochs
        value_module = module.critic
        weights = {
            **{f"p.{k}": v for k, v in module.policy.state_dict().items()},
            **{f"v.{k}": v for k, v in value_module.state_dict().items()},
        }
        results.append((weights, logged, module.learner.update_stats))
    (w_reuse, log_reuse, upd_reuse), (w_plain, log_plain, upd_plain) = results
    for k in w_plain:  # float noise only: one element in 12k differs by 6e-6 on some batch orders
        torch.testing.assert_close(w_reuse[k], w_plain[k], rtol=1e-4, atol=1e-5)
    assert set(log_reuse) == set(log_plain)
    for k in (
        "ppo/kl",
        "ppo/entropy",
        "ppo/values_mean",
        "ppo/advantages_mean",
        "ppo/returns_mean",
        "ppo/policy_loss",
        "ppo/value_loss",
        "ppo/reward_score",
        "ppo/explained_variance",
    ):
        torch.testing.assert_close(log_reuse[k], log_plain[k], rtol=1e-4, atol=1e-5)
    assert upd_reuse[0]["ratio_mean"].item() == 1.0
    assert len(upd_reuse) == len(upd_plain) == 3


def test_policy_and_critic_train_with_gradient_checkpointing(exports, tmp_path):
    # Exports load in eval mode; HF skips checkpointing outside train mode, so the module must switch.
    L.seed_everything(0)
    plain = make(exports, ppo_epochs=1)
    plain.configure_model()
    assert plain.policy.training and plain.critic.training
    assert not plain.ref_policy.training and not plain.reward_model.training
    L.seed_everything(0)
    ckpt = make(exports, ppo_epochs=1, gradient_checkpointing=True)
    ckpt.configure_model()
    assert ckpt.policy.is_gradient_checkpointing and ckpt.critic.model.is_gradient_checkpointing
    for m in (plain, ckpt):
        L.seed_everything(0)
        trainer(tmp_path, max_steps=1).fit(m, datamodule=make_data(exports))
    # Recomputation changes memory, not results.
    for a, b in zip(plain.policy.parameters(), ckpt.policy.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_truncated_sampling_is_flagged(exports):
    # Top-k/top-p/greedy sampling makes the recomputed full-softmax log-probs refer to another policy.
    with pytest.warns(UserWarning, match="off-policy"):
        make(exports, sampling=SamplingConfig(max_new_tokens=8, top_k=20))
    with pytest.warns(UserWarning, match="off-policy"):
        make(exports, sampling=SamplingConfig(max_new_tokens=8, top_p=0.9))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        make(exports)  # full-distribution sampling: no warning


def test_several_rollout_batches_per_learning_phase(exports, tmp_path):
    # rollout_batches=2: two prompt batches are sampled, then one learning phase runs over
    # all 8 samples (whole buffer = one minibatch, so the first forward is reused); the
    # separate-pass path gives the same weights.
    weights = []
    for reuse in (True, False):
        L.seed_everything(0)
        module = make(exports, ppo_epochs=2, rollout_batches=2, reuse_rollout_forward=reuse)
        seen = []

        class Count(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                seen.append((batch_idx, trainer.global_step, pl_module.iteration))  # noqa: B023 (used in this pass)

        trainer(tmp_path, max_steps=2, callbacks=[Count()]).fit(module, datamodule=make_data(exports, batch_size=4))
        # Batch 0 only collects; batch 1 completes the buffer and takes 2 optimizer steps (2 epochs).
        assert seen == [(0, 0, 0), (1, 2, 1)]
        assert len(module.learner.update_stats) == 2 and module.learner.update_stats[0]["ratio_mean"].item() == 1.0
        weights.append({k: v.clone() for k, v in module.policy.state_dict().items()})
    # Equal up to float rounding of the two forward orders; AdamW's normalised step can turn a
    # rounding-level gradient difference on a near-zero gradient into a few 1e-6 of weight.
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=1e-4, atol=1e-5)
