"""Advantage estimators by name: how a rollout's scores become per-token advantages.

Each entry turns a scored :class:`~rlhf_lightning.rl.rollout.Rollout` into
``(advantages, returns)`` of shape ``(B, A)`` (``returns`` is None without a critic),
calling the pure functions of ``advantages.py``. Configs name them
(``estimator: grpo``); a new estimator is one more entry here.

Where the KL penalty goes is the system's choice (``kl_in_loss``): in the reward it is
per token for token-level estimators (``kl_penalized_rewards``: ``-coef * kl_t`` plus the
score at the last token) and per sequence for group estimators (``score - coef * sum_t kl_t``);
in the loss it is not in ``rewards`` at all.
"""

from __future__ import annotations

from collections.abc import Callable
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
    """An advantage estimator: ``fn(rollout, settings) -> (advantages, returns or None)``."""

    fn: Callable[[Rollout, EstimatorSettings], tuple[torch.Tensor, torch.Tensor | None]]
    needs_values: bool = False  # needs a critic
    needs_groups: bool = False  # needs several samples per prompt


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
    kl = (adv.kl_per_token(r.logprobs, r.ref_logprobs, s.kl_estimator) * r.response_mask).sum(-1)  # (B,)
    return r.scores - s.kl_coef * kl


def _broadcast(seq_adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return seq_adv[:, None] * mask  # (B, A): the sequence's advantage on each of its tokens


def _gae(r: Rollout, s: EstimatorSettings):
    r.rewards = _token_rewards(r, s)
    return adv.gae(r.rewards, r.values, r.response_mask, s.gamma, s.lam)


def _reinforce_pp(r: Rollout, s: EstimatorSettings):
    r.rewards = _token_rewards(r, s)
    return adv.reinforce_pp_advantages(r.rewards, r.response_mask, s.gamma)


def _group(scale_by_std: bool):
    def fn(r: Rollout, s: EstimatorSettings):
        a = adv.group_advantages(_sequence_scores(r, s), r.group_ids, scale_by_std=scale_by_std)  # (B,)
        return _broadcast(a, r.response_mask), None

    return fn


def _rloo(r: Rollout, s: EstimatorSettings):
    return _broadcast(adv.rloo_advantages(_sequence_scores(r, s), r.group_ids), r.response_mask), None


ESTIMATORS: dict[str, Estimator] = {
    "gae": Estimator(_gae, needs_values=True),
    "grpo": Estimator(_group(scale_by_std=True), needs_groups=True),
    "dr_grpo": Estimator(_group(scale_by_std=False), needs_groups=True),
    "rloo": Estimator(_rloo, needs_groups=True),
    "reinforce_pp": Estimator(_reinforce_pp),
}


def get_estimator(name: str) -> Estimator:
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; known: {sorted(ESTIMATORS)}")
    return ESTIMATORS[name]
