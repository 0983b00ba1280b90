"""PPO against a frozen reward model (Ziegler et al. 2019; Ouyang et al. 2022), with every known detail.

One ``training_step`` is one PPO iteration over a batch of prompts:

1. **rollout** (no grad): sample responses (left-padded prompts, KV cache, stop at EOS),
   score query+response with the frozen reward model at the last real token, and take
   log-probs of the policy and the frozen reference and the critic's values;
2. **advantages**: per-token KL-penalised rewards with the score at the last token,
   GAE, whitening across the rollout batch (all ranks);
3. **learn**: ``ppo_epochs`` passes over shuffled minibatches, gradient accumulation
   over micro-batches (token-weighted, so 1x8 = 8x1), gradient clipping;
4. **KL control**: the adaptive controller moves the coefficient towards its target.

With one minibatch and no micro-batching (the usual small-model setting) the rollout's
policy log-probs and critic values are not computed in step 1: the first forward of
step 3 gives exactly the same numbers (the policy has not moved yet and dropout is off),
so it fills them, step 2 runs on them, and its graph is reused for the first update.
That saves one policy and one critic forward per iteration (``reuse_rollout_forward``).

``trainer.global_step`` counts optimizer steps (``ppo_epochs`` x minibatches per
iteration); ``ppo/iteration`` counts iterations.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from rlhf_lightning.advantages import (
    AdaptiveKLController,
    FixedKLController,
    explained_variance,
    gae,
    kl_penalized_rewards,
    kl_per_token,
)
from rlhf_lightning.callbacks import log_samples
from rlhf_lightning.generation import (
    Generation,
    SamplingConfig,
    decode_responses,
    sample_responses,
    warn_if_truncated,
)
from rlhf_lightning.logprobs import masked_mean, masked_whiten
from rlhf_lightning.losses import ppo_policy_loss, ppo_value_loss
from rlhf_lightning.models import ValueHead, load_reward_model, response_logprobs
from rlhf_lightning.rl.rollout import Rollout, RolloutBuffer
from rlhf_lightning.systems.base import PolicySystem

class PPOModule(PolicySystem):
    """PPO for a causal-LM policy; frozen reference and reward model, separate or shared critic."""

    def __init__(
        self,
        model: str,
        reward_model: str,
        ref_model: str | None = None,
        critic_model: str | None = None,
        tokenizer: str | None = None,
        shared_value_head: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        critic_lr: float | None = None,
        sampling: SamplingConfig | None = None,
        ppo_epochs: int = 4,
        minibatch_size: int | None = None,
        micro_batch_size: int | None = None,
        rollout_batches: int = 1,
        clip_range: float = 0.2,
        clip_range_value: float | None = 0.2,
        vf_coef: float = 0.1,
        max_grad_norm: float | None = 1.0,
        gamma: float = 1.0,
        lam: float = 0.95,
        init_kl_coef: float = 0.05,
        kl_target: float | None = 6.0,
        kl_horizon: float = 10000.0,
        kl_estimator: str = "k1",
        whiten_advantages: bool = True,
        whiten_rewards: bool = False,
        normalize_reward: bool = True,
        missing_eos_penalty: float | None = -1.0,
        logprob_temperature: float | None = None,
        disable_dropout: bool = True,
        gradient_checkpointing: bool = False,
        reuse_rollout_forward: bool = True,
        sample_log_every_n_steps: int = 10,
        trust_remote_code: bool = False,
    ):
        """
        Args:
            model: the policy's starting point (the SFT export).
            reward_model: the reward-model export (``AutoModelForSequenceClassification``).
            ref_model: the frozen reference; default: a second copy of ``model``.
            critic_model: the critic's starting point; default: ``reward_model``.
            shared_value_head: a zero-initialised value head on the policy instead of a
                separate critic (saves one model's memory and compute).
            critic_lr: the critic's learning rate (default: the optimizer's).
            sampling: rollout sampling settings (``max_new_tokens`` is the response budget).
            minibatch_size: samples per optimizer step (default: the whole buffer).
            micro_batch_size: samples per forward/backward (default: the minibatch).
            rollout_batches: prompt batches collected before each learning phase.
            kl_target: target KL of the adaptive controller; None for a fixed coefficient.
            kl_estimator: per-token KL in the reward: ``k1`` (unbiased) or ``k3`` (>= 0).
            normalize_reward: apply the gain/bias stored in the reward export.
            missing_eos_penalty: score given to responses that end without EOS; None keeps their score.
            logprob_temperature: temperature of the recomputed log-probs; default the
                sampling temperature (anything else makes ratio and KL refer to another policy).
            gradient_checkpointing: recompute activations of the policy and critic in
                backward (less memory, about a third more compute); sampling is unaffected.
            reuse_rollout_forward: when the whole buffer is one minibatch and one micro-batch
                and dropout is off, take the rollout-time log-probs and values from the first
                learning forward instead of a separate no-grad pass (identical numbers).
        """
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self._setup_policy(model, None, tokenizer or model, optimizer, lr_scheduler, trust_remote_code, sampling)
        self.automatic_optimization = False
        self.ref_policy = self.reward_model = self.critic = self.value_head = None
        self.kl_ctl = (
            AdaptiveKLController(init_kl_coef, kl_target, kl_horizon)
            if kl_target is not None
            else FixedKLController(init_kl_coef)
        )
        kl_per_token(torch.zeros(1), torch.zeros(1), kl_estimator)  # fail early on a bad estimator name
        warn_if_truncated(self.sampling, "PPO")
        self.buffer = RolloutBuffer(pad_token_id=self.tokenizer.pad_token_id)
        self.iteration = 0
        self.minibatch_generator = torch.Generator()
        self.update_stats: list[dict[str, torch.Tensor]] = []

    # ----------------------------------------------------------------------------- models
    def build_models(self) -> None:
        hp = self.hparams
        self.policy = self.load_policy()
        self.add_frozen("ref_policy", self.load_frozen_lm(hp.ref_model or hp.model))
        self.add_frozen("reward_model", self._load_scorer(hp.reward_model))
        if hp.shared_value_head:
            self.value_head = ValueHead(self.policy.config.hidden_size)
        else:
            # On the reward's (normalised) scale, so its first values predict the returns it is trained on.
            self.critic = self.prepare_trainable(self._load_scorer(hp.critic_model or hp.reward_model))

    def _load_scorer(self, path: str) -> torch.nn.Module:
        return load_reward_model(path, normalize=self.hparams.normalize_reward, trust_remote_code=self.trust_remote_code)

    def param_groups(self) -> list[dict[str, Any]]:
        value_module = self.value_head if self.hparams.shared_value_head else self.critic
        critic_group = {"params": [p for p in value_module.parameters() if p.requires_grad]}
        if self.hparams.critic_lr is not None:
            critic_group["lr"] = self.hparams.critic_lr
        return [{"params": [p for p in self.policy.parameters() if p.requires_grad]}, critic_group]

    def _policy_outputs(self, r: Rollout, with_entropy: bool = False) -> dict[str, torch.Tensor]:
        """Log-probs (and shared-head values, entropy) of the response tokens of ``r``."""
        ids, mask = r.sequences()  # (B, Q+A)
        out = response_logprobs(self.policy, ids, mask, r.query_width, self.logprob_temperature,
                                with_entropy=with_entropy, with_hidden=self.value_head is not None)
        result = {"logprobs": out.logprobs}  # (B, A)
        if with_entropy:
            result["entropy"] = out.entropy  # (B, A)
        if self.value_head is not None:
            result["values"] = self.value_head(out.hidden).float()  # (B, A)
        return result

    def _critic_values(self, r: Rollout) -> torch.Tensor:
        ids, mask = r.sequences()  # (B, Q+A)
        A = r.response_ids.shape[1]
        return self.critic.token_values(ids, mask)[:, -A - 1 : -1].float()  # (B, A)

    def _ref_logprobs(self, r: Rollout) -> torch.Tensor:
        ids, mask = r.sequences()  # (B, Q+A)
        return response_logprobs(self.ref_policy, ids, mask, r.query_width, self.logprob_temperature).logprobs  # (B, A)

    # ----------------------------------------------------------------------------- rollout
    def _batch_sizes(self, n_samples: int) -> tuple[int, int]:
        """(minibatch, micro-batch) sizes for a buffer of ``n_samples``."""
        mb = self.hparams.minibatch_size or n_samples
        return mb, self.hparams.micro_batch_size or mb

    def _one_pass(self, n_samples: int) -> bool:
        """Whether a buffer of ``n_samples`` is one minibatch of one micro-batch."""
        return min(self._batch_sizes(n_samples)) >= n_samples

    def reuses_rollout_forward(self, n_samples: int) -> bool:
        """Whether a buffer of ``n_samples`` is learned from in one minibatch of one micro-batch,
        so that the first learning forward can stand in for the rollout-time one."""
        hp = self.hparams
        if not (hp.reuse_rollout_forward and hp.disable_dropout):
            return False
        if hp.rollout_batches > 1:  # the buffer's final size is not known per batch: decide from the settings
            return hp.minibatch_size is None and hp.micro_batch_size is None
        return self._one_pass(n_samples)

    @torch.no_grad()
    def collect_rollout(self, batch: dict[str, Any], old_outputs: bool = True) -> tuple[Rollout, dict[str, torch.Tensor]]:
        """Sample and score one batch of prompts; returns the rollout (no advantages yet) and its stats.

        With ``old_outputs=False`` the policy log-probs and critic values are left ``None``
        for :meth:`learn` to fill from its first forward (see ``reuse_rollout_forward``).
        """
        t0 = time.perf_counter()
        q_ids, q_mask = batch["input_ids"], batch["attention_mask"]  # (B, Q)
        gen = sample_responses(self.policy, q_ids, q_mask, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id, self.sampling)
        t1 = time.perf_counter()
        r = Rollout(query_ids=q_ids, query_mask=q_mask, response_ids=gen.response_ids, response_mask=gen.response_mask)
        scores = self.reward_model(*r.sequences()).float()  # (B,) read at the last real token
        entropy = self.fill_old_outputs(r) if old_outputs else None
        r.ref_logprobs = self._ref_logprobs(r)  # (B, A)
        penalty = self.hparams.missing_eos_penalty
        r.scores = scores if penalty is None else torch.where(gen.ended, scores, torch.full_like(scores, penalty))
        m = r.response_mask
        stats = {
            "reward_score": scores.mean(),
            "reward_score_penalized": r.scores.mean(),
            "response_length": m.sum(-1).float().mean(),
            "eos_rate": gen.ended.float().mean(),
            "time_generate": torch.tensor(t1 - t0),
            "time_score": torch.tensor(time.perf_counter() - t1),
        }
        if entropy is not None:
            stats["entropy"] = entropy
        return r, stats

    @torch.no_grad()
    def fill_old_outputs(self, r: Rollout) -> torch.Tensor:
        """Set ``r.logprobs`` and ``r.values`` from the current (not yet updated) policy and
        critic; returns the policy's mean entropy over the response tokens."""
        self.policy.eval()  # dropout is off anyway; eval keeps any other train-time behaviour out
        pol = self._policy_outputs(r, with_entropy=True)
        self.policy.train()
        r.logprobs = pol["logprobs"]
        r.values = pol["values"] if self.value_head is not None else self._critic_values(r)
        return masked_mean(pol["entropy"], r.response_mask)

    @torch.no_grad()
    def compute_advantages(self, r: Rollout) -> dict[str, torch.Tensor]:
        """Fill ``rewards``, ``advantages`` and ``returns`` of the buffered rollout."""
        hp = self.hparams
        m = r.response_mask
        distributed = self._trainer is not None and self.trainer.world_size > 1
        r.rewards = kl_penalized_rewards(r.scores, r.logprobs, r.ref_logprobs, m, self.kl_ctl.value, hp.kl_estimator)
        if hp.whiten_rewards:
            r.rewards = masked_whiten(r.rewards, m, shift_mean=False, all_reduce=distributed)
        r.advantages, r.returns = gae(r.rewards, r.values, m, hp.gamma, hp.lam)
        if hp.whiten_advantages:
            r.advantages = masked_whiten(r.advantages, m, all_reduce=distributed)
        kl_k1 = (kl_per_token(r.logprobs, r.ref_logprobs, "k1") * m).sum(-1)  # (B,) sequence KL
        kl_k3 = (kl_per_token(r.logprobs, r.ref_logprobs, "k3") * m).sum(-1)  # (B,)
        return {"kl": kl_k1.mean(), "kl_k3": kl_k3.mean(), "kl_coef": torch.tensor(float(self.kl_ctl.value)),
                "advantages_mean": masked_mean(r.advantages, m), "returns_mean": masked_mean(r.returns, m),
                "values_mean": masked_mean(r.values, m)}

    # ----------------------------------------------------------------------------- learning
    def _clip(self) -> None:
        if self.hparams.max_grad_norm is None:
            return
        value_module = self.value_head if self.value_head is not None else self.critic
        for module in (self.policy, value_module):  # clipped separately: one model's spike never scales the other
            torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None], self.hparams.max_grad_norm)

    def accumulate_gradients(self, mb: Rollout, micro_batch_size: int, backward=None) -> dict[str, torch.Tensor]:
        """Backward of the PPO loss of one minibatch, in micro-batches, token-weighted.

        Each micro-batch's token-mean loss is weighted by its share of the minibatch's
        response tokens, so the accumulated gradient equals that of the whole minibatch's
        token mean whatever the micro-batch size (1x8 = 8x1).
        """
        hp = self.hparams
        backward = backward or self.manual_backward
        n_tokens = mb.response_mask.sum().clamp_min(1)
        stats: dict[str, torch.Tensor] = {}
        for start in range(0, mb.batch_size, micro_batch_size):
            part = mb.select(range(start, min(start + micro_batch_size, mb.batch_size)))
            out = self._policy_outputs(part)
            values = out["values"] if self.value_head is not None else self._critic_values(part)
            loss, terms = self._ppo_loss(part, out["logprobs"], values)
            weight = part.response_mask.sum() / n_tokens
            backward(loss * weight)
            for k, v in terms.items():
                stats[k] = stats.get(k, 0.0) + v * weight
        return stats

    def _ppo_loss(self, r: Rollout, logprobs: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hp = self.hparams
        pg_loss, pg = ppo_policy_loss(logprobs, r.logprobs, r.advantages, r.response_mask, hp.clip_range)
        vf_loss, vf = ppo_value_loss(values, r.values, r.returns, r.response_mask, hp.clip_range_value)
        return pg_loss + hp.vf_coef * vf_loss, {**pg, **vf}

    def _first_update_from_rollout_forward(self, r: Rollout) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Backward of the first update whose forward also supplies the rollout's log-probs and values.

        Before any update the policy and critic are the rollout-time ones, so their outputs
        here, detached, are the "old" log-probs and values; advantages are computed from them
        and the loss is taken on the same graph (ratio exactly 1, value clipping inactive).
        Returns ``(advantage stats, loss terms)``.
        """
        out = self._policy_outputs(r, with_entropy=True)
        values = out["values"] if self.value_head is not None else self._critic_values(r)
        r.logprobs = out["logprobs"].detach()
        r.values = values.detach()
        adv_stats = self.compute_advantages(r)
        adv_stats["entropy"] = masked_mean(out["entropy"], r.response_mask)
        loss, terms = self._ppo_loss(r, out["logprobs"], values)
        self.manual_backward(loss)
        return adv_stats, terms

    def learn(self, r: Rollout) -> dict[str, torch.Tensor]:
        """``ppo_epochs`` passes of minibatch updates over the rollout ``r``.

        If ``r`` has no advantages yet they are computed here (their stats are returned
        too); if it also lacks the rollout-time log-probs and values, the first update's
        forward supplies them when the buffer is one minibatch of one micro-batch, and a
        separate no-grad pass does otherwise.
        """
        hp = self.hparams
        opt = self.optimizers()
        sched = self.lr_schedulers()
        mb_size, micro = self._batch_sizes(r.batch_size)
        totals: dict[str, torch.Tensor] = {}
        self.update_stats = []  # per optimizer step, for inspection (the first has ratio exactly 1)
        epochs = hp.ppo_epochs
        stats: dict[str, torch.Tensor] = {}

        def finish_step(step_stats: dict[str, torch.Tensor]) -> None:
            for k, v in step_stats.items():
                totals[k] = totals.get(k, 0.0) + v
            self.update_stats.append(step_stats)
            self._clip()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if sched is not None:
                sched.step()

        if r.logprobs is None and self._one_pass(r.batch_size) and epochs > 0:
            adv_stats, first = self._first_update_from_rollout_forward(r)
            stats.update(adv_stats)
            finish_step(first)
            epochs -= 1
        else:
            if r.logprobs is None:
                stats["entropy"] = self.fill_old_outputs(r)
            if r.advantages is None:
                stats.update(self.compute_advantages(r))
        buf = RolloutBuffer(self.tokenizer.pad_token_id)
        buf.add(r)
        for mb in buf.minibatches(mb_size, epochs=epochs, generator=self.minibatch_generator):
            finish_step(self.accumulate_gradients(mb, micro))
        n_updates = max(len(self.update_stats), 1)
        stats.update({k: v / n_updates for k, v in totals.items()})
        return stats

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        n = batch["input_ids"].shape[0] * self.hparams.rollout_batches
        rollout, stats = self.collect_rollout(batch, old_outputs=not self.reuses_rollout_forward(n))
        self.buffer.add(rollout)
        if self.hparams.rollout_batches > 1 and (batch_idx + 1) % self.hparams.rollout_batches:
            return  # keep collecting
        r = self.buffer.all()
        self.buffer.clear()
        t0 = time.perf_counter()
        if r.logprobs is not None:
            stats.update(self.compute_advantages(r))
        stats.update(self.learn(r))
        stats["time_learn"] = torch.tensor(time.perf_counter() - t0)
        with torch.no_grad():
            stats["explained_variance"] = explained_variance(r.values, r.returns, r.response_mask)
        # The controller sees the KL averaged over every rank's samples.
        mean_kl = self.trainer.strategy.reduce(stats["kl"].to(self.device), reduce_op="mean")
        self.kl_ctl.update(float(mean_kl), r.batch_size * self.trainer.world_size)
        self.iteration += 1
        stats["iteration"] = torch.tensor(float(self.iteration))
        self.log_dict({f"ppo/{k}": v.float().to(self.device) for k, v in stats.items()},
                      on_step=True, prog_bar=False, sync_dist=self.trainer.world_size > 1, batch_size=r.batch_size)
        self.log("ppo/reward", stats["reward_score"].to(self.device), prog_bar=True, batch_size=r.batch_size)
        every = self.hparams.sample_log_every_n_steps
        if every and (self.iteration - 1) % every == 0:
            self._log_samples(batch, r)

    def _log_samples(self, batch: dict[str, Any], r: Rollout, n: int = 4) -> None:
        texts = decode_responses(self.tokenizer, Generation(r.response_ids[:n], r.response_mask[:n], r.response_mask[:n].bool().any(-1)))
        rows = [[self.iteration, p, t, float(s)] for p, t, s in zip(batch["prompts"][:n], texts, r.scores[:n])]
        log_samples(self.trainer, "ppo/samples", ["iteration", "prompt", "response", "score"], rows)

    # ----------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # leaves the frozen models out
        checkpoint["ppo_state"] = {
            "kl_ctl": self.kl_ctl.state_dict(),
            "iteration": self.iteration,
            "minibatch_generator": self.minibatch_generator.get_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("ppo_state")
        if state is not None:
            self.kl_ctl.load_state_dict(state["kl_ctl"])
            self.iteration = int(state["iteration"])
            self.minibatch_generator.set_state(state["minibatch_generator"])

    def on_fit_start(self) -> None:
        # One seed drives everything; each rank offsets it so rollouts differ across ranks.
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) + self.global_rank
        if self.iteration == 0:
            self.minibatch_generator.manual_seed(seed)
            torch.manual_seed(seed)

    # ----------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate_batch(self, batch: dict[str, Any], sampling: SamplingConfig | None = None) -> dict[str, Any]:
        """Sample held-out prompts and measure proxy score, KL to the reference, length and EOS."""
        gen = sample_responses(self.policy, batch["input_ids"], batch["attention_mask"], self.tokenizer.eos_token_id,
                               self.tokenizer.pad_token_id, sampling or self.sampling)
        r = Rollout(batch["input_ids"], batch["attention_mask"], gen.response_ids, gen.response_mask)
        was_training = self.policy.training
        self.policy.eval()
        logp = self._policy_outputs(r)["logprobs"]
        self.policy.train(was_training)
        ref_logp = self._ref_logprobs(r)
        kl = ((logp - ref_logp) * r.response_mask).sum(-1)  # (B,) Monte-Carlo sequence KL
        return {
            "prompts": list(batch["prompts"]),
            "responses": decode_responses(self.tokenizer, gen),
            "proxy": self.reward_model(*r.sequences()).float().tolist(),
            "kl": kl.tolist(),
            "length": gen.lengths.float().tolist(),
            "ended": gen.ended.tolist(),
        }
