"""Advantage estimators by name: how a rollout's scores become per-token advantages.

Each entry turns a scored :class:`~rlhf_lightning.rl.rollout.Rollout` into
``(advantages, returns)`` of shape ``(B, A)`` (``returns`` is None for critic-free
estimators), calling the pure function of the same name in ``advantages.ESTIMATORS``.
Configs name them (``estimator: grpo``); a new estimator is a function there and an entry
here saying how to call it.

Where the KL penalty goes is the system's choice (``kl_in_loss``): in the reward it is
per token for token-level estimators (``kl_penalized_rewards``: ``-coef * kl_t`` plus the
score at the last token) and per sequence for group estimators (``score - coef * sum_t kl_t``);
in the loss it is not in ``rewards`` at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_lightning import advantages as adv
from rlhf_lightning.rl.rollout import Rollout


@dataclass(frozen=True)
class EstimatorSettings:
    """What the estimators read besides the rollout."""

    kl_coef: float
    kl_estimator: str = "k1"
    kl_in_reward: bool = True
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    distributed: bool = False


@dataclass(frozen=True)
class Estimator:
    """How the system calls ``advantages.ESTIMATORS[name]`` (the pure function of that name).

    ``level``: ``"token"`` functions take per-token rewards and return ``(advantages, returns)``
    (``gae`` also takes the critic's values); ``"sequence"`` functions take ``(scores, group_ids)``
    and return one advantage per sample, broadcast here over its response tokens.
    """

    name: str
    level: str = "token"
    needs_values: bool = False  # needs a critic
    needs_groups: bool = False  # needs several samples per prompt

    def __call__(self, r: Rollout, s: EstimatorSettings) -> tuple[torch.Tensor, torch.Tensor | None]:
        fn = adv.ESTIMATORS[self.name]
        m = r.response_mask
        if self.level == "sequence":
            return fn(_sequence_scores(r, s), r.group_ids)[:, None] * m, None  # (B, A): each sample's on its tokens
        r.rewards = _token_rewards(r, s)
        if self.needs_values:
            return fn(r.rewards, r.values, m, s.gamma, s.lam)
        return fn(r.rewards, m, s.gamma, all_reduce=s.distributed)


def _token_rewards(r: Rollout, s: EstimatorSettings) -> torch.Tensor:
    """``(B, A)`` per-token rewards: the score at the last real token, minus the KL when it goes in the reward."""
    coef = s.kl_coef if s.kl_in_reward else 0.0
    rewards = adv.kl_penalized_rewards(r.scores, r.logprobs, r.ref_logprobs, r.response_mask, coef, s.kl_estimator)
    if s.whiten_rewards:
        rewards = adv.masked_whiten(rewards, r.response_mask, shift_mean=False, all_reduce=s.distributed)
    return rewards  # (B, A)


def _sequence_scores(r: Rollout, s: EstimatorSettings) -> torch.Tensor:
    """``(B,)`` scores minus the sequence KL when it goes in the reward."""
    if not s.kl_in_reward or s.kl_coef == 0:
        return r.scores
    return r.scores - s.kl_coef * adv.sequence_kl(r.logprobs, r.ref_logprobs, r.response_mask, s.kl_estimator)


ESTIMATORS: dict[str, Estimator] = {
    "gae": Estimator("gae", needs_values=True),
    "reinforce_pp": Estimator("reinforce_pp"),
    "grpo": Estimator("grpo", level="sequence", needs_groups=True),
    "dr_grpo": Estimator("dr_grpo", level="sequence", needs_groups=True),
    "rloo": Estimator("rloo", level="sequence", needs_groups=True),
}


def get_estimator(name: str) -> Estimator:
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; known: {sorted(ESTIMATORS)}")
    return ESTIMATORS[name]
