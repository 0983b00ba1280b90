"""KL-penalised per-token rewards, advantage estimators and KL controllers.

Token-level tensors are over response (action) tokens: ``(B, A)``, with ``mask`` 1 on
real response tokens (up to and including EOS) and 0 on padding; results are 0 outside
the mask. The critic-free estimators (GRPO, Dr. GRPO, RLOO) work on ``(B,)`` sequence
scores with ``(B,)`` integer ``group_ids`` (samples of one prompt share an id; groups
need not be contiguous) and return ``(B,)`` advantages that the caller broadcasts to
``(B, A)``. :data:`ESTIMATORS` maps the names configs use to the functions. No metrics
are returned here; the training systems log what they need.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .logprobs import masked_var, masked_whiten

__all__ = [
    "KL_ESTIMATORS",
    "kl_per_token",
    "kl_penalized_rewards",
    "sequence_kl",
    "gae",
    "reinforce_pp_advantages",
    "group_advantages",
    "dr_grpo_advantages",
    "rloo_advantages",
    "groups_with_signal",
    "ESTIMATORS",
    "explained_variance",
    "AdaptiveKLController",
    "FixedKLController",
]


def _k1(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return logp - ref


def _k2(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logp - ref) ** 2


def _k3(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    log_r = ref - logp  # log(ref / pi)
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from log-probs of tokens sampled from pi.

    With ``log r = log ref(y) - log pi(y)`` (Schulman 2020, "Approximating KL divergence"):

    - ``k1 = -log r = log pi - log ref``: unbiased, can be negative per token;
    - ``k2 = 0.5 (log r)^2``: biased, low variance, non-negative;
    - ``k3 = (r - 1) - log r``: unbiased, low variance, non-negative.

    Args:
        logprobs: ``(B, A)`` log-probs under the policy that sampled the tokens.
        ref_logprobs: ``(B, A)`` log-probs under the reference model.
        estimator: one of ``"k1"``, ``"k2"``, ``"k3"``.

    Returns:
        ``(B, A)`` per-token KL estimates (not masked).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logprobs, ref_logprobs)


def sequence_kl(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, estimator: str = "k1"
) -> torch.Tensor:
    """``(B,)`` Monte-Carlo KL(pi || ref) of each sampled sequence: ``sum_t kl_t`` over the mask.

    Args:
        logprobs, ref_logprobs: ``(B, A)`` log-probs of the sampled tokens under pi and ref.
        mask: ``(B, A)`` 1 on real response tokens.
        estimator: per-token estimator of :func:`kl_per_token` (``k1``, ``k2``, ``k3``).
    """
    return (kl_per_token(logprobs, ref_logprobs, estimator) * mask).sum(-1)  # (B,)


def kl_penalized_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
    estimator: str = "k1",
) -> torch.Tensor:
    """Dense per-token rewards: a KL penalty on every token plus the score at the end.

    ``r_{b,t} = -kl_coef * KL_{b,t} + [t = last_b] * score_b`` on masked tokens, 0
    elsewhere (Ziegler et al. 2019; Ouyang et al. 2022, eq. 2), where ``last_b``
    is the last masked position of row ``b`` (ragged rows allowed; a row with an empty
    mask gets nothing).

    Args:
        scores: ``(B,)`` sequence-level reward-model scores (after any penalty).
        logprobs: ``(B, A)`` rollout-policy log-probs.
        ref_logprobs: ``(B, A)`` reference log-probs.
        mask: ``(B, A)`` 1 on real response tokens.
        kl_coef: KL penalty coefficient ``beta``.
        estimator: see :func:`kl_per_token`.

    Returns:
        ``(B, A)`` rewards in the dtype of ``logprobs``.
    """
    m = mask.bool()
    rewards = -kl_coef * kl_per_token(logprobs, ref_logprobs, estimator)  # (B, A)
    rewards = torch.where(m, rewards, torch.zeros_like(rewards))
    positions = torch.arange(m.shape[-1], device=m.device).expand_as(m)  # (B, A)
    last = torch.where(m, positions, torch.full_like(positions, -1)).max(dim=-1).values  # (B,)
    has_tokens = last >= 0  # (B,)
    bonus = torch.where(has_tokens, scores.to(rewards.dtype), torch.zeros_like(scores, dtype=rewards.dtype))  # (B,)
    return rewards.scatter_add(-1, last.clamp_min(0).unsqueeze(-1), bonus.unsqueeze(-1))


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over response tokens.

    ``delta_t = r_t + gamma V_{t+1} - V_t``; ``A_t = delta_t + gamma lam A_{t+1}``;
    ``R_t = A_t + V_t``. Only masked positions are time steps: ``t+1`` is the next
    masked position of the row, and the episode ends at the last masked token (the value
    after it is 0, the episode is terminal). Positions outside the mask are skipped and
    get 0. Vectorised over the batch; one Python step per response position.

    Args:
        rewards: ``(B, A)`` per-token rewards (e.g. :func:`kl_penalized_rewards`).
        values: ``(B, A)`` critic values at rollout time.
        mask: ``(B, A)`` 1 on real response tokens.
        gamma: discount.
        lam: GAE lambda (bias/variance trade-off).

    Returns:
        ``(advantages, returns)``, each ``(B, A)``, 0 outside the mask. Computed without
        gradient tracking (they are targets).
    """
    with torch.no_grad():
        m = mask.bool()
        zeros = torch.zeros_like(values[:, 0])  # (B,)
        next_value, next_adv = zeros, zeros
        advantages = torch.zeros_like(values)  # (B, A)
        for t in reversed(range(values.shape[-1])):
            m_t = m[:, t]  # (B,)
            delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
            adv_t = delta + gamma * lam * next_adv  # (B,)
            advantages[:, t] = torch.where(m_t, adv_t, zeros)
            next_adv = torch.where(m_t, adv_t, next_adv)  # skip unmasked positions
            next_value = torch.where(m_t, values[:, t], next_value)
        returns = torch.where(m, advantages + values, torch.zeros_like(values))
    return advantages, returns


def reinforce_pp_advantages(
    rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, *, all_reduce: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025): discounted reward-to-go, whitened over the whole batch.

    ``R_t = sum_{s >= t} gamma^(s - t) r_s`` over the masked positions of the row
    (as in :func:`gae`, only masked positions are time steps); ``A = (R - mean) / std``
    with the mean and unbiased std over ALL masked tokens of the batch (not per prompt
    or per row, the point of REINFORCE++). ``rewards`` carry the per-token KL penalty
    and the score at the last token: build them with :func:`kl_penalized_rewards`.
    The reward-to-go is :func:`gae` with zero values and ``lam = 1``.

    Args:
        rewards: ``(B, A)`` per-token rewards.
        mask: ``(B, A)`` 1 on real response tokens.
        gamma: discount.
        all_reduce: whiten with statistics over every rank (see
            :func:`~rlhf_lightning.logprobs.masked_whiten`; every rank must call this).

    Returns:
        ``(advantages, returns)``, each ``(B, A)``, 0 outside the mask, without gradient.
    """
    with torch.no_grad():
        returns = gae(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0)[0]  # (B, A)
        advantages = masked_whiten(returns, mask, all_reduce=all_reduce)  # (B, A)
    return advantages, returns


def _group_stats(
    scores: torch.Tensor, group_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shared group statistics, vectorised with ``torch.unique`` and ``index_add``.

    Returns ``(s, inverse, n, mean, signal)``: ``s`` the ``(B,)`` scores in at least
    float32; ``inverse`` the ``(B,)`` index of each sample's group in ``[0, G)``; ``n``
    and ``mean`` the ``(G,)`` group sizes and means; ``signal`` a ``(B,)`` bool, True
    where the sample's group has two distinct scores (``max > min``; a size-1 group has
    none). ``torch.unique`` synchronises with the host on CUDA (once per call).
    """
    if scores.dim() != 1 or group_ids.shape != scores.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and group_ids {tuple(group_ids.shape)} must both be (B,)")
    s = scores.to(torch.promote_types(scores.dtype, torch.float32))  # (B,)
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)  # (B,), (G,)
    n = counts.to(s.dtype)  # (G,)
    mean = torch.zeros_like(n).index_add(0, inverse, s) / n  # (G,)
    hi = torch.zeros_like(n).scatter_reduce(0, inverse, s, "amax", include_self=False)  # (G,)
    lo = torch.zeros_like(n).scatter_reduce(0, inverse, s, "amin", include_self=False)  # (G,)
    return s, inverse, n, mean, (hi > lo)[inverse]


def group_advantages(
    scores: torch.Tensor, group_ids: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Group-relative advantages: GRPO (Shao et al. 2024, sec. 4.1.2) and
    Dr. GRPO (Liu et al. 2025) with ``scale_by_std=False``.

    ``A_i = (s_i - mean_g) / (std_g + eps)`` (or ``s_i - mean_g``) over the group ``g`` of
    sample ``i``. ``std_g`` is the unbiased sample std (Bessel, ``/(k - 1)``), as TRL,
    OpenRLHF and verl compute it (``torch.std``), so advantages match those frameworks;
    the biased std would inflate small groups' advantages by ``sqrt(k / (k - 1))``.
    A group whose scores are all equal, including a group of size 1, carries no signal
    and gets exactly 0 (never ``nan``, also with ``eps=0``; not an ulp of rounding in the
    mean divided by ``eps``).

    Args:
        scores: ``(B,)`` sequence scores (any real dtype).
        group_ids: ``(B,)`` integer prompt ids; groups need not be contiguous.
        scale_by_std: divide by the group std (GRPO); False is Dr. GRPO.
        eps: added to the std.

    Returns:
        ``(B,)`` advantages in at least float32.
    """
    s, inverse, n, mean, signal = _group_stats(scores, group_ids)
    adv = s - mean[inverse]  # (B,)
    if scale_by_std:
        var = torch.zeros_like(n).index_add(0, inverse, adv**2) / (n - 1).clamp_min(1)  # (G,) unbiased
        adv = adv / (var.sqrt()[inverse] + eps)  # (B,)
    return torch.where(signal, adv, torch.zeros_like(adv))


def dr_grpo_advantages(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025): ``s_i - mean_g``, no division by the group std.

    :func:`group_advantages` with ``scale_by_std=False`` (a named function rather than a
    ``functools.partial``: the maths layer imports only torch, and it has a docstring).
    """
    return group_advantages(scores, group_ids, scale_by_std=False)


def rloo_advantages(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, "Back to Basics"; Kool et al. 2019).

    ``A_i = s_i - (1/(k-1)) sum_{j != i} s_j = k/(k-1) (s_i - mean_g)`` for a group of
    size ``k``: the baseline of each sample is the mean score of the OTHER samples of its
    prompt. A group of size 1 has no other sample, hence no baseline: it gets 0 (like
    :func:`group_advantages`) rather than an error, so a batch left with a singleton
    (e.g. after filtering) still trains on the other groups. All-equal groups get 0.

    Args:
        scores: ``(B,)`` sequence scores.
        group_ids: ``(B,)`` integer prompt ids; groups need not be contiguous.

    Returns:
        ``(B,)`` advantages in at least float32.
    """
    s, inverse, n, mean, signal = _group_stats(scores, group_ids)
    k = n[inverse]  # (B,)
    adv = (s - mean[inverse]) * k / (k - 1).clamp_min(1)  # (B,)
    return torch.where(signal, adv, torch.zeros_like(adv))


def groups_with_signal(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """DAPO dynamic sampling (Yu et al. 2025): which samples are worth training on.

    A group whose scores are all equal (all solved, all failed, or a single sample) has
    zero group-relative advantage and only dilutes the batch; DAPO drops such groups and
    samples more prompts.

    Args:
        scores: ``(B,)`` sequence scores.
        group_ids: ``(B,)`` integer prompt ids; groups need not be contiguous.

    Returns:
        ``(B,)`` bool, True where the sample's group has at least two distinct scores.
    """
    return _group_stats(scores, group_ids)[-1]


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong penalty (Yu et al. 2025), added to the sequence score.

    ``0`` up to ``max_length - buffer`` tokens, then falling linearly to ``-1`` at
    ``max_length`` (and ``-1`` beyond): ``-clamp((L - (max_length - buffer)) / buffer, 0, 1)``.

    Args:
        lengths: ``(B,)`` response lengths in tokens.
        max_length: the response budget (``max_new_tokens``).
        buffer: the width of the penalised zone, ``1 <= buffer <= max_length``.

    Returns:
        ``(B,)`` float32 penalties in ``[-1, 0]``.
    """
    if not 1 <= buffer <= max_length:
        raise ValueError(f"overlong buffer must be in [1, max_length={max_length}], got {buffer}")
    excess = lengths.float() - (max_length - buffer)  # (B,)
    return -(excess / buffer).clamp(0.0, 1.0)


# What configs name (``advantage_estimator: grpo``). Plain data: a new estimator is a new
# entry. Two call shapes: token level ``gae(rewards, values, mask, ...)`` and
# ``reinforce_pp(rewards, mask, ...)`` return ``(advantages, returns)``, each ``(B, A)``;
# sequence level ``fn(scores, group_ids)`` returns ``(B,)`` advantages.
ESTIMATORS: dict[str, Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]]] = {
    "gae": gae,
    "reinforce_pp": reinforce_pp_advantages,
    "grpo": group_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fraction of the return variance explained by the critic: ``1 - Var[R - V] / Var[R]``.

    1 is a perfect critic, 0 no better than a constant, negative worse. Variances are
    over masked tokens; ``Var[R] = 0`` gives ``nan`` or ``inf`` (undefined).

    Args:
        values: ``(B, A)`` critic values.
        returns: ``(B, A)`` returns.
        mask: ``(B, A)``.

    Returns:
        Scalar tensor (detached).
    """
    values, returns = values.detach().float(), returns.detach().float()
    return 1 - masked_var(returns - values, mask) / masked_var(returns, mask)


class AdaptiveKLController:
    """Proportional controller for the KL coefficient (Ziegler et al. 2019,
    "Fine-Tuning Language Models from Human Preferences").

    ``err = clip(KL / target - 1, -0.2, 0.2)``; ``beta <- beta (1 + err * n_steps / horizon)``:
    the coefficient grows when the measured KL is above the target and shrinks below it.

    Args:
        init_kl_coef: starting coefficient.
        target: KL (nats per sequence) to hold.
        horizon: number of samples over which to correct a full error.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        """Adjust ``value`` after ``n_steps`` samples measured mean KL ``current_kl``."""
        err = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """Plain-float state for checkpointing."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore from :meth:`state_dict`."""
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))


class FixedKLController:
    """Constant KL coefficient with the :class:`AdaptiveKLController` interface.

    Args:
        kl_coef: the coefficient.
    """

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        """Does nothing (the coefficient is fixed)."""

    def state_dict(self) -> dict[str, float]:
        """Plain-float state for checkpointing."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore from :meth:`state_dict`."""
        self.value = float(state["value"])
