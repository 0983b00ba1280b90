"""Online RL on prompts: PPO, GRPO, RLOO and REINFORCE++ as one system with an injected estimator.

One ``training_step`` is one iteration over a batch of prompts:

1. **rollout** (no grad): sample ``num_samples`` responses per prompt (left-padded
   prompts, KV cache, stop at EOS; samples of a prompt share a group id and stay on
   its rank), score them (reward model and/or reward functions, missing-EOS penalty),
   and take the reference's log-probs, the policy's and the critic's values;
2. **advantages**: the estimator named by ``estimator`` (``rl/estimators.py``: ``gae``
   with a critic, or the critic-free ``grpo``, ``dr_grpo``, ``rloo``, ``reinforce_pp``),
   with the KL either in the reward or, with ``kl_in_loss``, as a term of the loss;
3. **learn**: ``ppo_epochs`` passes over shuffled minibatches of the clipped surrogate
   (optionally asymmetric, DAPO), gradient accumulation over micro-batches weighted by
   the reduction's denominator (so 1x8 = 8x1), gradient clipping per model;
4. **KL control**: with ``kl_target`` the adaptive controller moves the coefficient.

With one minibatch of one micro-batch the rollout's policy log-probs and critic values
are not computed in step 1: the first forward of step 3 gives exactly the same numbers
(the policy has not moved and dropout is off), fills them, step 2 runs on them, and its
graph is reused for the first update (``reuse_rollout_forward``; decided in
:meth:`OnlineRLModule.reuses_rollout_forward`).

Metrics go under ``<stage>/`` (``ppo/kl``, ``grpo/reward_score``, ...).
``trainer.global_step`` counts optimizer steps; ``<stage>/iteration`` counts iterations.
"""

from __future__ import annotations

import os
import time
from functools import partial
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from rlhf_lightning import advantages as adv
from rlhf_lightning import logprobs as lp
from rlhf_lightning import losses
from rlhf_lightning.callbacks import log_samples
from rlhf_lightning.generation import SamplingConfig, decode_responses, warn_if_truncated
from rlhf_lightning.models import DEFAULT_CHUNK_SIZE, LoraSettings, load_reward_model
from rlhf_lightning.rl.critics import SeparateCritic, ValueHeadCritic
from rlhf_lightning.rl.engine import RolloutEngine
from rlhf_lightning.rl.estimators import EstimatorSettings, get_estimator
from rlhf_lightning.rl.learner import Learner
from rlhf_lightning.rl.rewards import RewardFunctionSpec, RewardSources
from rlhf_lightning.rl.rollout import Rollout, RolloutBuffer
from rlhf_lightning.rng import gather_ranks
from rlhf_lightning.systems.base import PolicySystem

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


class OnlineRLModule(PolicySystem):
    """Sampling-based RL of a causal-LM policy against reward models and/or reward functions."""

    def __init__(
        self,
        model: str,
        reward_model: str | None = None,
        reward_functions: list[RewardFunctionSpec] | None = None,
        reward_model_weight: float = 1.0,
        ref_model: str | None = None,
        critic_model: str | None = None,
        tokenizer: str | None = None,
        stage: str = "ppo",
        estimator: str = "gae",
        num_samples: int = 1,
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
        clip_range_high: float | None = None,
        clip_range_value: float | None = 0.2,
        vf_coef: float = 0.1,
        max_grad_norm: float | None = 1.0,
        gamma: float = 1.0,
        lam: float = 0.95,
        init_kl_coef: float = 0.05,
        kl_target: float | None = 6.0,
        kl_horizon: float = 10000.0,
        kl_estimator: str = "k1",
        kl_in_loss: bool = False,
        loss_aggregation: str = "token_mean",
        whiten_advantages: bool = True,
        whiten_rewards: bool = False,
        dynamic_sampling: bool = False,
        normalize_reward: bool = True,
        missing_eos_penalty: float | None = -1.0,
        overlong_buffer: int | None = None,
        overlong_penalty_factor: float = 1.0,
        logprob_temperature: float | None = None,
        disable_dropout: bool = True,
        gradient_checkpointing: bool = False,
        logprob_chunk_size: int | str | None = DEFAULT_CHUNK_SIZE,
        reuse_rollout_forward: bool = True,
        sample_log_every_n_steps: int = 10,
        trust_remote_code: bool = False,
        lora: LoraSettings | None = None,
    ):
        """
        Args:
            model: the policy's starting point (the SFT export); also the reference unless ``ref_model``.
            reward_model: a reward-model export (``AutoModelForSequenceClassification``), or None.
            reward_functions: ``module:function`` reward functions with weights (``rl/rewards.py``).
            reward_model_weight: the reward model's weight in the sum of sources.
            critic_model: the separate critic's start (default: ``reward_model``); used by ``gae`` only.
            stage: the metric prefix (``ppo``, ``grpo``, ``rloo``, ``reinforce_pp``).
            estimator: ``gae`` (needs a critic), ``grpo``, ``dr_grpo``, ``rloo``, ``reinforce_pp``.
            num_samples: responses per prompt (a group); group estimators need at least 2.
            shared_value_head: for ``gae``, a zero-initialised value head on the policy instead
                of a separate critic model.
            critic_lr: the critic's learning rate (default: the optimizer's).
            sampling: rollout sampling settings (``max_new_tokens`` is the response budget).
            ppo_epochs: passes over each rollout (GRPO's mu); minibatch_size: samples per
                optimizer step (default: the whole buffer); micro_batch_size: samples per
                forward/backward (default: the minibatch).
            rollout_batches: prompt batches collected before each learning phase.
            clip_range, clip_range_high: the ratio is clipped to ``[1 - clip_range, 1 + clip_range_high]``
                (``clip_range_high`` None: symmetric; DAPO's clip-higher uses e.g. 0.28).
            init_kl_coef, kl_target, kl_horizon: the KL coefficient, adaptive when ``kl_target``
                is set (Ziegler et al.), fixed otherwise.
            kl_estimator: ``k1`` (unbiased) or ``k3`` (>= 0, low variance).
            kl_in_loss: add ``coef * KL`` to the loss (GRPO) instead of subtracting it from the reward.
            loss_aggregation: ``token_mean`` (over the batch's tokens), ``seq_mean_token_mean``
                (GRPO paper) or ``seq_mean_token_sum_norm`` (Dr. GRPO: token sums divided by
                ``max_new_tokens``).
            dynamic_sampling: drop groups whose scores are all equal (no signal; DAPO), counted.
            normalize_reward: apply the gain/bias stored in the reward export.
            missing_eos_penalty: the score of responses without EOS; None keeps their score.
            overlong_buffer: DAPO's soft overlong penalty: responses longer than
                ``max_new_tokens - overlong_buffer`` lose up to ``overlong_penalty_factor``
                (linearly, all of it at ``max_new_tokens``), added after the missing-EOS
                penalty, whatever the reward source; None: off.
            logprob_temperature: temperature of the recomputed log-probs; default the
                sampling temperature (anything else makes ratio and KL refer to another policy).
            gradient_checkpointing: recompute activations of the policy and critic in backward.
            logprob_chunk_size: log-probs and entropy come from the last hidden states this
                many rows at a time (``"auto"``: about 2^25 logits), never the full ``(B, A, V)``
                logits; None: from full logits.
            reuse_rollout_forward: take the rollout-time log-probs and values from the first
                learning forward when the buffer is one minibatch of one micro-batch.
            lora: LoRA adapters on the policy and the separate critic (whose score head trains
                in full) instead of full fine-tuning; the reference is then the policy with its
                adapter off, unless ``ref_model`` names another model.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self._setup_policy(model, None, tokenizer or model, optimizer, lr_scheduler, trust_remote_code, sampling)
        self.automatic_optimization = False
        for name in ("num_samples", "ppo_epochs", "rollout_batches", "minibatch_size", "micro_batch_size"):
            value = getattr(self.hparams, name, None)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{type(self).__name__}: {name} must be a positive integer, got {value!r}")
        self.estimator = get_estimator(estimator)
        if self.estimator.needs_groups and num_samples < 2:
            raise ValueError(f"estimator {estimator!r} compares samples of the same prompt: set num_samples >= 2")
        if loss_aggregation not in AGGREGATIONS:
            raise ValueError(f"loss_aggregation must be one of {AGGREGATIONS}, got {loss_aggregation!r}")
        if reward_model is None and not reward_functions:
            raise ValueError("no reward source: set reward_model, reward_functions, or both")
        self.ref_policy = self.reward_model = self.critic = None
        self.kl_ctl = (
            adv.AdaptiveKLController(init_kl_coef, kl_target, kl_horizon)
            if kl_target is not None
            else adv.FixedKLController(init_kl_coef)
        )
        adv.kl_per_token(torch.zeros(1), torch.zeros(1), kl_estimator)  # fail early on a bad estimator name
        warn_if_truncated(self.sampling, stage.upper())
        if overlong_buffer is not None:  # fail at construction, not after the first rollout
            adv.overlong_penalty(torch.zeros(1), self.sampling.max_new_tokens, overlong_buffer)
        self.buffer = RolloutBuffer(pad_token_id=self.tokenizer.pad_token_id)
        self.iteration = 0
        self._state_after_batch: dict[str, Any] | None = None  # see _mark_batch_end
        self.minibatch_generator = torch.Generator()
        self.learner = Learner(self)
        self.engine: RolloutEngine | None = None

    # ----------------------------------------------------------------------------- models
    def build_models(self) -> None:
        hp = self.hparams
        self.policy = self.load_policy()
        if not self.reference_is_base:
            self.add_frozen("ref_policy", self.load_frozen_lm(hp.ref_model or hp.model))
        if hp.reward_model is not None:
            self.add_frozen("reward_model", self._load_scorer(hp.reward_model))
        if self.estimator.needs_values and hp.shared_value_head:
            self.critic = ValueHeadCritic(self.policy.config.hidden_size)
        elif self.estimator.needs_values:
            # On the reward's (normalised) scale, so its first values predict the returns it is trained on.
            scorer = self._load_scorer(hp.critic_model or hp.reward_model)
            self.critic = self.prepare_trainable(SeparateCritic.from_reward_model(scorer))
        rewards = RewardSources(self.reward_model, hp.reward_model_weight, hp.reward_functions or ())
        self.engine = RolloutEngine(self, rewards)

    def _load_scorer(self, path: str) -> torch.nn.Module:
        return load_reward_model(
            path, normalize=self.hparams.normalize_reward, trust_remote_code=self.trust_remote_code
        )

    def param_groups(self) -> list[dict[str, Any]]:
        groups = [{"params": [p for p in self.policy.parameters() if p.requires_grad]}]
        if self.critic is not None:
            critic_group = {"params": [p for p in self.critic.parameters() if p.requires_grad]}
            if self.hparams.critic_lr is not None:
                critic_group["lr"] = self.hparams.critic_lr
            groups.append(critic_group)
        return groups

    @property
    def stage(self) -> str:
        return self.hparams.stage

    # ----------------------------------------------------------------------------- rollout and advantages
    def reuses_rollout_forward(self, n_samples: int) -> bool:
        """Whether the first learning forward can stand in for the rollout-time one for a
        buffer of ``n_samples``: one minibatch of one micro-batch, dropout off."""
        hp = self.hparams
        if not (hp.reuse_rollout_forward and hp.disable_dropout):
            return False
        if hp.rollout_batches > 1:  # the buffer's final size is not known per batch: decide from the settings
            return hp.minibatch_size is None and hp.micro_batch_size is None
        return self.learner.one_pass(n_samples)

    def collect_rollout(
        self, batch: dict[str, Any], old_outputs: bool = True
    ) -> tuple[Rollout, dict[str, torch.Tensor]]:
        """Sample and score one batch of prompts (see :class:`~rlhf_lightning.rl.engine.RolloutEngine`)."""
        return self.engine.collect(batch, old_outputs=old_outputs)

    def fill_old_outputs(self, r: Rollout) -> torch.Tensor:
        """Set ``r.logprobs`` and ``r.values`` from the not yet updated policy and critic; returns the mean entropy."""
        return self.engine.fill_old_outputs(r)

    @torch.no_grad()
    def compute_advantages(self, r: Rollout) -> dict[str, torch.Tensor]:
        """Fill ``rewards`` (token-level estimators), ``advantages`` and ``returns`` of the rollout."""
        hp = self.hparams
        m = r.response_mask
        distributed = self._trainer is not None and self.trainer.world_size > 1
        settings = EstimatorSettings(
            kl_coef=self.kl_ctl.value,
            kl_estimator=hp.kl_estimator,
            kl_in_reward=not hp.kl_in_loss,
            gamma=hp.gamma,
            lam=hp.lam,
            whiten_rewards=hp.whiten_rewards,
            distributed=distributed,
        )
        r.advantages, r.returns = self.estimator(r, settings)
        if hp.whiten_advantages:
            r.advantages = lp.masked_whiten(r.advantages, m, all_reduce=distributed)
        kl_k1 = adv.sequence_kl(r.logprobs, r.ref_logprobs, m, "k1")  # (B,)
        kl_k3 = adv.sequence_kl(r.logprobs, r.ref_logprobs, m, "k3")  # (B,)
        stats = {
            "kl": kl_k1.mean(),
            "kl_k3": kl_k3.mean(),
            "kl_coef": torch.tensor(float(self.kl_ctl.value)),
            "advantages_mean": lp.masked_mean(r.advantages, m),
        }
        if r.returns is not None:
            stats["returns_mean"] = lp.masked_mean(r.returns, m)
        if r.values is not None:
            stats["values_mean"] = lp.masked_mean(r.values, m)
        return stats

    # ----------------------------------------------------------------------------- loss
    def aggregate(self):
        """The loss reduction over ``(B, A)`` per-token terms (a function of ``(x, mask)``)."""
        name = self.hparams.loss_aggregation
        if name == "seq_mean_token_sum_norm":
            return partial(lp.seq_mean_token_sum_norm, norm=self.sampling.max_new_tokens)
        return lp.seq_mean_token_mean if name == "seq_mean_token_mean" else lp.masked_mean

    def loss(self, r: Rollout, logprobs: torch.Tensor, values: torch.Tensor | None):
        """Clipped surrogate (+ value loss with a critic, + KL term with ``kl_in_loss``) and its metrics."""
        hp = self.hparams
        kwargs = {}
        if hp.clip_range_high is not None or hp.loss_aggregation != "token_mean":
            kwargs = {"clip_range_high": hp.clip_range_high, "aggregate": self.aggregate()}
        loss, terms = losses.ppo_policy_loss(
            logprobs, r.logprobs, r.advantages, r.response_mask, hp.clip_range, **kwargs
        )
        if values is not None:
            vf_loss, vf = losses.ppo_value_loss(values, r.values, r.returns, r.response_mask, hp.clip_range_value)
            loss, terms = loss + hp.vf_coef * vf_loss, {**terms, **vf}
        if hp.kl_in_loss and self.kl_ctl.value:
            kl, kl_terms = losses.kl_loss(
                logprobs, r.ref_logprobs, r.response_mask, hp.kl_estimator, aggregate=self.aggregate()
            )
            loss, terms = loss + self.kl_ctl.value * kl, {**terms, **kl_terms}
        return loss, terms

    # ----------------------------------------------------------------------------- the iteration
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        hp = self.hparams
        n = batch["input_ids"].shape[0] * hp.num_samples * hp.rollout_batches
        rollout, stats = self.collect_rollout(batch, old_outputs=not self.reuses_rollout_forward(n))
        self.buffer.add(rollout)
        if hp.rollout_batches > 1 and (batch_idx + 1) % hp.rollout_batches:
            return  # keep collecting
        r = self.buffer.all()
        self.buffer.clear()
        if hp.dynamic_sampling:
            r, stats["groups_dropped"] = self.engine.drop_groups_without_signal(r)
        t0 = time.perf_counter()
        if r.batch_size:
            if r.logprobs is not None:
                stats.update(self.compute_advantages(r))
            stats.update(self.learner.learn(r))
            if r.values is not None:
                with torch.no_grad():
                    stats["explained_variance"] = adv.explained_variance(r.values, r.returns, r.response_mask)
        stats["time_learn"] = torch.tensor(time.perf_counter() - t0)
        if "kl" in stats:  # the controller sees the KL averaged over every rank's samples
            mean_kl = self.trainer.strategy.reduce(stats["kl"].to(self.device), reduce_op="mean")
            self.kl_ctl.update(float(mean_kl), r.batch_size * self.trainer.world_size)
        self.iteration += 1
        stats["iteration"] = torch.tensor(float(self.iteration))
        self.log_dict(
            {f"{self.stage}/{k}": torch.as_tensor(v).float().to(self.device) for k, v in stats.items()},
            on_step=True,
            prog_bar=False,
            sync_dist=self.trainer.world_size > 1,
            batch_size=max(r.batch_size, 1),
        )
        self.log(
            f"{self.stage}/reward",
            stats["reward_score"].to(self.device),
            prog_bar=True,
            batch_size=max(r.batch_size, 1),
        )
        every = hp.sample_log_every_n_steps
        if every and (self.iteration - 1) % every == 0 and r.batch_size:
            self._log_samples(r)

    def _log_samples(self, r: Rollout, n: int = 4) -> None:
        texts = decode_responses(self.tokenizer, r.select(range(min(n, r.batch_size))).generation())
        rows = [[self.iteration, p, t, float(s)] for p, t, s in zip(r.prompts[:n], texts, r.scores[:n], strict=True)]
        log_samples(self.trainer, f"{self.stage}/samples", ["iteration", "prompt", "response", "score"], rows)

    # ----------------------------------------------------------------------------- checkpoints
    def _iteration_state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the iteration loop as of now; under ``own``, this rank's: its
        minibatch shuffle and the rollouts it collected towards the next update (a snapshot)."""
        own = {"minibatch_generator": self.minibatch_generator.get_state(), "buffer": self.buffer.snapshot()}
        group = self.engine._next_group if self.engine is not None else 0
        return {"kl_ctl": self.kl_ctl.state_dict(), "iteration": self.iteration, "next_group": group, "own": own}

    def _mark_batch_end(self) -> None:
        # A checkpoint written on an exception in the next batch redoes that batch: it holds this
        # state, not one the batch's sampling (group ids, buffer) or learning has moved on.
        super()._mark_batch_end()
        self._state_after_batch = self._iteration_state()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # leaves the frozen models out; RNG streams
        last = self._state_after_batch
        state = dict(last if checkpoint.get("mid_batch") and last is not None else self._iteration_state())
        own = state.pop("own")
        own = {**own, "buffer": self.buffer.state_dict(own["buffer"])}
        checkpoint["ppo_state"] = {**state, "ranks": gather_ranks(own)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("ppo_state")
        if state is None:
            return
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.iteration = int(state["iteration"])
        if self.engine is not None:  # built by configure_model, which Lightning calls before loading
            self.engine._next_group = int(state.get("next_group", 0))
        ranks = state.get("ranks") or [{"minibatch_generator": state["minibatch_generator"]}]  # older checkpoints
        own = ranks[self.global_rank] if self.global_rank < len(ranks) else ranks[0]
        self.minibatch_generator.set_state(own["minibatch_generator"])
        self.buffer.load_state_dict(own.get("buffer", {"rollouts": []}))

    def on_fit_start(self) -> None:
        # One seed drives everything; each rank offsets it so rollouts differ across ranks.
        # A resumed run (iteration > 0) restores its streams instead (on_train_start).
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) + self.global_rank
        if self.iteration == 0:
            self.minibatch_generator.manual_seed(seed)
            torch.manual_seed(seed)

    def on_train_start(self) -> None:
        super().on_train_start()
        self.buffer.to(self.device)  # rollouts loaded from a checkpoint sit on the CPU
