"""The rollout engine: prompts in, a scored :class:`~rlhf_lightning.rl.rollout.Rollout` out.

For a batch of left-padded prompts it

1. repeats each prompt ``num_samples`` times (the copies form a group with one id; a
   batch is one rank's, so a group never spans ranks);
2. samples responses from the policy (``generation.sample_responses``: KV cache, stop
   at EOS, everything after the first EOS masked);
3. scores query+response with the reward sources (a reward model, reward functions or
   both), then gives ``missing_eos_penalty`` to responses that never ended and, when
   ``overlong_buffer`` is set, DAPO's soft overlong penalty to long ones;
4. takes the frozen reference's log-probs and, unless the first learning forward will
   stand in for it, the policy's log-probs, entropy and the critic's values.

Every log-prob comes from ``models.response_logprobs`` at the system's log-prob temperature.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from rlhf_lightning import advantages as adv
from rlhf_lightning.generation import decode_responses, sample_responses
from rlhf_lightning.logprobs import masked_mean
from rlhf_lightning.models import ResponseOutputs, response_logprobs
from rlhf_lightning.rl.rewards import RewardSources
from rlhf_lightning.rl.rollout import Rollout

if TYPE_CHECKING:
    from rlhf_lightning.systems.online_rl import OnlineRLModule


class RolloutEngine:
    """Collects rollouts for an online-RL system (its policy, reference, critic and settings)."""

    def __init__(self, system: OnlineRLModule, rewards: RewardSources):
        self.system = system
        self.rewards = rewards
        self._next_group = 0  # group ids stay distinct across the batches of one buffer

    # ----------------------------------------------------------------------------- forward passes
    def policy_outputs(self, r: Rollout, with_entropy: bool = False) -> tuple[ResponseOutputs, torch.Tensor | None]:
        """The policy's response log-probs (entropy, hidden states as needed) and the critic's values."""
        s = self.system
        critic = s.critic
        ids, mask = r.sequences()  # (B, Q+A)
        out = response_logprobs(
            s.policy,
            ids,
            mask,
            r.query_width,
            s.logprob_temperature,
            with_entropy=with_entropy,
            with_hidden=critic is not None and critic.needs_hidden,
            chunk_size=s.hparams.logprob_chunk_size,
        )
        values = None if critic is None else critic.values(ids, mask, r.query_width, out.hidden)  # (B, A)
        return out, values

    def ref_logprobs(self, r: Rollout) -> torch.Tensor:
        ids, mask = r.sequences()  # (B, Q+A)
        s = self.system
        with s.reference() as ref:  # a frozen model, or the LoRA policy with its adapter off
            return response_logprobs(
                ref, ids, mask, r.query_width, s.logprob_temperature, chunk_size=s.hparams.logprob_chunk_size
            ).logprobs  # (B, A)

    @torch.no_grad()
    def fill_old_outputs(self, r: Rollout) -> torch.Tensor:
        """Set ``r.logprobs`` and ``r.values`` from the current (not yet updated) policy and
        critic; returns the policy's mean entropy over the response tokens."""
        policy = self.system.policy
        policy.eval()  # dropout is off anyway; eval keeps any other train-time behaviour out
        out, values = self.policy_outputs(r, with_entropy=True)
        policy.train()
        r.logprobs, r.values = out.logprobs, values
        return masked_mean(out.entropy, r.response_mask)

    # ----------------------------------------------------------------------------- collection
    @torch.no_grad()
    def collect(self, batch: dict[str, Any], old_outputs: bool = True) -> tuple[Rollout, dict[str, torch.Tensor]]:
        """Sample and score one batch of prompts; returns the rollout (no advantages yet) and its stats.

        With ``old_outputs=False`` the policy log-probs and critic values are left ``None``
        for the learner to fill from its first forward (``reuse_rollout_forward``).
        """
        s = self.system
        tok = s.tokenizer
        n = s.hparams.num_samples
        t0 = time.perf_counter()
        q_ids, q_mask, prompts = batch["input_ids"], batch["attention_mask"], list(batch["prompts"])  # (B, Q)
        groups = torch.arange(self._next_group, self._next_group + len(prompts), device=q_ids.device)  # (B,)
        self._next_group += len(prompts)
        if n > 1:
            q_ids, q_mask, groups = (x.repeat_interleave(n, dim=0) for x in (q_ids, q_mask, groups))  # (B*n, Q)
            prompts = [p for p in prompts for _ in range(n)]
        gen = sample_responses(s.policy, q_ids, q_mask, tok.eos_token_id, tok.pad_token_id, s.sampling)
        t1 = time.perf_counter()
        r = Rollout(
            query_ids=q_ids,
            query_mask=q_mask,
            response_ids=gen.response_ids,
            response_mask=gen.response_mask,
            group_ids=groups,
            prompts=prompts,
        )
        texts = decode_responses(tok, gen) if self.rewards.functions else None
        scores, score_stats = self.rewards(prompts, texts, *r.sequences())  # (B,) read at the last real token
        entropy = self.fill_old_outputs(r) if old_outputs else None
        r.ref_logprobs = self.ref_logprobs(r)  # (B, A)
        penalty = s.hparams.missing_eos_penalty
        r.scores = scores if penalty is None else torch.where(gen.ended, scores, torch.full_like(scores, penalty))
        if s.hparams.overlong_buffer is not None:
            lengths = r.response_mask.sum(-1)  # (B,)
            overlong = adv.overlong_penalty(lengths, s.sampling.max_new_tokens, s.hparams.overlong_buffer)
            r.scores = r.scores + s.hparams.overlong_penalty_factor * overlong.to(r.scores.dtype)
        stats = {
            "reward_score": scores.mean(),
            "reward_score_penalized": r.scores.mean(),
            "response_length": r.response_mask.sum(-1).float().mean(),
            "eos_rate": gen.ended.float().mean(),
            "time_generate": torch.tensor(t1 - t0),
            "time_score": torch.tensor(time.perf_counter() - t1),
        }
        if len(score_stats) > 1:  # several sources: show each one's mean
            stats.update(score_stats)
        if entropy is not None:
            stats["entropy"] = entropy
        return r, stats

    @staticmethod
    def drop_groups_without_signal(r: Rollout) -> tuple[Rollout, torch.Tensor]:
        """Keep the samples of groups whose scores differ (DAPO's dynamic sampling); returns the
        rollout and the fraction of groups dropped."""
        keep = adv.groups_with_signal(r.scores, r.group_ids)  # (B,)
        n_groups = r.group_ids.unique().numel()
        kept_groups = r.group_ids[keep].unique().numel()
        dropped = torch.tensor(1.0 - kept_groups / max(n_groups, 1))
        return r.select(keep.nonzero().squeeze(-1)), dropped
