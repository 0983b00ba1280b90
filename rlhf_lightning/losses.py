"""Pure loss functions: SFT, pairwise reward model, the DPO family, PPO policy and value,
and the KL-to-reference loss term of critic-free RL (GRPO and its variants).

Every function returns ``(loss, metrics)``: ``loss`` is a differentiable scalar and
``metrics`` a dict of detached scalar tensors (the LightningModule adds the
``<stage>/`` prefix when logging). "Token mean" means the sum over masked tokens of the
whole batch divided by their count.

DPO-family functions share one signature,
``(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, ...)``
with ``(B,)`` sequence log-probs, and carry two attributes telling the DPO module how to
call them: ``fn.reference_free`` (no reference model needed) and ``fn.length_normalized``
(pass per-token mean log-probs instead of sums). A new variant is a new function.

Token-level losses take the reduction over ``(B, A)`` as ``aggregate``, an
``(x, mask) -> scalar`` function from :mod:`~rlhf_lightning.logprobs`: ``masked_mean``
(token mean; PPO, DAPO), ``seq_mean_token_mean`` (GRPO) or
``functools.partial(seq_mean_token_sum_norm, norm=...)`` (Dr. GRPO).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .advantages import kl_per_token
from .logprobs import masked_mean, token_logprobs

__all__ = [
    "sft_loss",
    "pairwise_loss",
    "dpo_loss",
    "ipo_loss",
    "hinge_loss",
    "simpo_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "kl_loss",
]

Metrics = dict[str, torch.Tensor]
Aggregate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B, A), mask (B, A)) -> scalar


def sft_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    denominator: torch.Tensor | float | None = None,
    logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Next-token negative log-likelihood, token mean over the batch.

    ``L = -(1/N) sum_{b,t: y_{b,t+1} != ignore} log p(y_{b,t+1} | y_{b,<=t})``.
    Hugging Face convention: ``labels`` has the length of ``input_ids``; the shift is
    done here (``logits[:, :-1]`` predict ``labels[:, 1:]``).

    Args:
        logits: ``(B, T, V)``.
        labels: ``(B, T)`` token ids, ``ignore_index`` on prompt and padding positions.
        ignore_index: label value that is not scored.
        denominator: divide the summed NLL by this instead of this batch's ``N``; with
            ``N_step / (accumulate x world_size)`` (``SFTDataModule``'s ``loss_denominator``)
            accumulated micro-batches give the token mean over the whole optimizer step.
        logps: ``(B, T-1)`` log-probs of ``labels[:, 1:]`` computed elsewhere (in chunks from
            hidden states, ``models.response_logprobs``); ``logits`` is then unused.

    Returns:
        ``(loss, {"loss", "ntokens"})``; an all-ignored batch gives loss 0. The metric
        ``loss`` is always this batch's token mean (what to log).
    """
    shift_labels = labels[:, 1:]  # (B, T-1)
    valid = shift_labels != ignore_index  # (B, T-1)
    safe_labels = torch.where(valid, shift_labels, torch.zeros_like(shift_labels))
    if logps is None:
        logps = token_logprobs(logits[:, :-1], safe_labels)  # (B, T-1)
    mean = -masked_mean(logps, valid)
    ntokens = valid.sum().detach().float()
    loss = mean if denominator is None else mean * ntokens / denominator  # summed NLL / denominator
    return loss, {"loss": mean.detach(), "ntokens": ntokens}


def pairwise_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    center_coef: float = 0.0,
    target: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Bradley–Terry reward-model loss (Ouyang et al. 2022, eq. 1), hard or soft labels.

    ``L = mean[-p log sigmoid(z) - (1 - p) log sigmoid(-z)] + c * mean[(r_c + r_r)^2]``, ``z = r_c - r_r - m``:
    the binary cross-entropy of the Bradley–Terry logit for ``p`` = P(chosen better) (``target``;
    None: 1, giving ``-log sigmoid(z)``), e.g. AI feedback's soft labels (Bai et al. 2022, 4.1).
    Margin ``m`` (Llama 2): a larger gap on clear pairs; centering (Eisenstein et al. 2023).

    Args:
        chosen_rewards, rejected_rewards: ``(B,)`` scalar rewards.
        margin: ``(B,)`` tensor or float, or None for 0; center_coef: weight of the centering term.
        target: ``(B,)`` soft labels in [0, 1], or None for 1.

    Returns:
        ``(loss, {"loss", "accuracy", "margin", "chosen_mean", "rejected_mean"})``;
        ``margin`` is the mean of ``r_c - r_r``.
    """
    diff = chosen_rewards - rejected_rewards  # (B,)
    logits = diff if margin is None else diff - margin
    loss = -F.logsigmoid(logits).mean()
    if target is not None:
        loss = -(target * F.logsigmoid(logits) + (1 - target) * F.logsigmoid(-logits)).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen_rewards + rejected_rewards) ** 2).mean()
    metrics = {
        "loss": loss.detach(),
        "accuracy": (diff > 0).float().mean().detach(),
        "margin": diff.mean().detach(),
        "chosen_mean": chosen_rewards.mean().detach(),
        "rejected_mean": rejected_rewards.mean().detach(),
    }
    return loss, metrics


def _preference_metrics(loss: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> Metrics:
    """Detached DPO-family metrics from ``(B,)`` implicit rewards."""
    chosen, rejected = chosen.detach(), rejected.detach()
    return {
        "loss": loss.detach(),
        "chosen_reward": chosen.mean(),
        "rejected_reward": rejected.mean(),
        "reward_margin": (chosen - rejected).mean(),
        "reward_accuracy": (chosen > rejected).float().mean(),
    }


def _logratio_gap(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``h = (pi_c - ref_c) - (pi_r - ref_r)`` and the two log-ratios, each ``(B,)``."""
    chosen_logratio = policy_chosen_logps - ref_chosen_logps
    rejected_logratio = policy_rejected_logps - ref_rejected_logps
    return chosen_logratio - rejected_logratio, chosen_logratio, rejected_logratio


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """Direct Preference Optimization (Rafailov et al. 2023, eq. 7), conservative variant.

    ``h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))``;
    ``L = mean[-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)]``.
    ``eps = label_smoothing`` is the assumed probability that a label is flipped
    (conservative DPO, Mitchell 2023); ``eps = 0`` is plain DPO.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(B,)`` summed log-probs under the policy.
        ref_chosen_logps, ref_rejected_logps: ``(B,)`` summed log-probs under the reference.
        beta: inverse temperature of the implicit reward (strength of the KL constraint).
        label_smoothing: ``eps`` in ``[0, 0.5)``.

    Returns:
        ``(loss, {"loss", "chosen_reward", "rejected_reward", "reward_margin",
        "reward_accuracy"})`` with implicit rewards ``beta * (log pi - log ref)``.
    """
    h, chosen_lr, rejected_lr = _logratio_gap(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    loss = losses.mean()
    return loss, _preference_metrics(loss, beta * chosen_lr, beta * rejected_lr)


dpo_loss.reference_free = False
dpo_loss.length_normalized = False


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """Identity Preference Optimisation (Azar et al. 2023, "A General Theoretical
    Paradigm to Understand Learning from Human Preferences"), ``tau = beta``.

    ``L = mean[(h - 1 / (2 beta))^2]``, ``h`` as in :func:`dpo_loss`: regresses the
    log-ratio gap to a finite target instead of pushing it to infinity.

    Args and returns as :func:`dpo_loss` (no label smoothing).
    """
    h, chosen_lr, rejected_lr = _logratio_gap(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    loss = ((h - 1 / (2 * beta)) ** 2).mean()
    return loss, _preference_metrics(loss, beta * chosen_lr, beta * rejected_lr)


ipo_loss.reference_free = False
ipo_loss.length_normalized = False


def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """Hinge (SLiC-style) preference loss (Zhao et al. 2023, SLiC-HF, calibration
    loss; with the reference log-ratio as in Liu et al. 2023, RSO).

    ``L = mean[relu(1 - beta h)]``, ``h`` as in :func:`dpo_loss`.

    Args and returns as :func:`dpo_loss` (no label smoothing).
    """
    h, chosen_lr, rejected_lr = _logratio_gap(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    loss = torch.relu(1 - beta * h).mean()
    return loss, _preference_metrics(loss, beta * chosen_lr, beta * rejected_lr)


hinge_loss.reference_free = False
hinge_loss.length_normalized = False


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> tuple[torch.Tensor, Metrics]:
    """Simple Preference Optimization (Meng et al. 2024), reference-free.

    ``L = mean[-log sigmoid(beta (pi_c - pi_r) - gamma)]`` where ``pi`` are
    length-normalised log-probs ``(1/|y|) log pi(y|x)`` (pass per-token means) and
    ``gamma`` is the target reward margin. Implicit rewards are ``beta * pi``.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(B,)`` mean per-token log-probs.
        ref_chosen_logps, ref_rejected_logps: ignored (kept for the common signature).
        beta: reward scale.
        gamma: target margin.

    Returns:
        As :func:`dpo_loss`.
    """
    chosen = beta * policy_chosen_logps  # (B,)
    rejected = beta * policy_rejected_logps  # (B,)
    loss = -F.logsigmoid(chosen - rejected - gamma).mean()
    return loss, _preference_metrics(loss, chosen, rejected)


simpo_loss.reference_free = True
simpo_loss.length_normalized = True


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
    clip_range_high: float | None = None,
    aggregate: Aggregate = masked_mean,
) -> tuple[torch.Tensor, Metrics]:
    """PPO clipped surrogate objective (Schulman et al. 2017, eq. 7), as a loss; with
    ``clip_range_high`` and ``aggregate`` also the GRPO, Dr. GRPO and DAPO policy loss.

    ``r = exp(log pi - log pi_old)``;
    ``L = agg[max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))]``, ``eps_low = clip_range``,
    ``eps_high = clip_range_high`` (DAPO "clip-higher", Yu et al. 2025, e.g. 0.2 / 0.28:
    a higher ceiling lets unlikely tokens with positive advantage gain probability;
    None means ``eps_high = eps_low``, symmetric PPO). With the defaults the result is
    bit-identical to plain PPO with a token mean.

    Args:
        logprobs: ``(B, A)`` log-probs of the taken tokens under the current policy.
        old_logprobs: ``(B, A)`` the same under the rollout policy.
        advantages: ``(B, A)`` (usually whitened; sequence advantages broadcast).
        mask: ``(B, A)`` 1 on response tokens.
        clip_range: ``eps_low``.
        clip_range_high: ``eps_high``, or None for ``clip_range``.
        aggregate: ``(x, mask) -> scalar`` reduction of the per-token losses (see the
            module docstring); default the token mean.

    Returns:
        ``(loss, {"policy_loss", "clipfrac", "clipfrac_low", "clipfrac_high", "approx_kl",
        "ratio_mean", "ratio_max"})``. ``policy_loss`` is the aggregated loss; the other
        metrics are token means over the masked tokens whatever ``aggregate`` is, so they
        stay fractions and compare across reductions. ``clipfrac``: tokens where the
        clipped term is strictly larger, i.e. chosen by the max (zero gradient), with any
        ``eps_low``/``eps_high``; split into ``clipfrac_high`` (``r > 1 + eps_high``,
        ``A > 0``) and ``clipfrac_low`` (``r < 1 - eps_low``, ``A < 0``). ``approx_kl``:
        token mean of ``(r - 1) - log r``, the k3 estimator of KL(pi_old || pi)
        (Schulman 2020, "Approximating KL divergence").
    """
    high = clip_range if clip_range_high is None else clip_range_high
    m = mask.bool()
    log_ratio = torch.where(m, logprobs - old_logprobs, torch.zeros_like(logprobs))  # (B, A); 0 off-mask avoids inf
    ratio = torch.exp(log_ratio)  # (B, A)
    unclipped = -advantages * ratio  # (B, A)
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + high)  # (B, A)
    loss = aggregate(torch.maximum(unclipped, clipped), m)
    with torch.no_grad():
        active = clipped > unclipped  # (B, A) the clipped term is the one taken
        metrics = {
            "policy_loss": loss.detach(),
            "clipfrac": masked_mean(active.float(), m),
            "clipfrac_low": masked_mean((active & (ratio < 1)).float(), m),
            "clipfrac_high": masked_mean((active & (ratio > 1)).float(), m),
            "approx_kl": masked_mean((ratio - 1) - log_ratio, m),
            "ratio_mean": masked_mean(ratio, m),
            "ratio_max": torch.where(m, ratio, torch.zeros_like(ratio)).max(),
        }
    return loss, metrics


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float | None = 0.2,
) -> tuple[torch.Tensor, Metrics]:
    """Clipped value loss (OpenAI baselines PPO2; Huang et al. 2023,
    "The N Implementation Details of RLHF with PPO").

    ``v_clip = v_old + clip(v - v_old, -c, c)``;
    ``L = 0.5 * token_mean[max((v - R)^2, (v_clip - R)^2)]``.

    Args:
        values: ``(B, A)`` current critic values.
        old_values: ``(B, A)`` values at rollout time.
        returns: ``(B, A)`` GAE returns (targets).
        mask: ``(B, A)`` 1 on response tokens.
        clip_range_value: ``c``; None disables clipping (plain ``0.5 * MSE``).

    Returns:
        ``(loss, {"value_loss", "vf_clipfrac"})``; ``vf_clipfrac`` is the fraction of
        masked tokens where the clipped term is strictly larger.
    """
    m = mask.bool()
    unclipped = (values - returns) ** 2  # (B, A)
    if clip_range_value is None:
        loss = 0.5 * masked_mean(unclipped, m)
        clipfrac = torch.zeros((), device=values.device)
    else:
        v_clip = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)  # (B, A)
        clipped = (v_clip - returns) ** 2  # (B, A)
        loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), m)
        clipfrac = masked_mean((clipped > unclipped).float(), m).detach()
    return loss, {"value_loss": loss.detach(), "vf_clipfrac": clipfrac}


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    estimator: str = "k3",
    aggregate: Aggregate = masked_mean,
) -> tuple[torch.Tensor, Metrics]:
    """KL(pi || ref) as a loss term, as GRPO uses it (Shao et al. 2024: the k3 estimate in
    the loss, not a penalty in the reward as PPO-RLHF does).

    ``L = agg[k(log pi, log ref)]`` with the per-token estimators of
    :func:`~rlhf_lightning.advantages.kl_per_token`; default
    ``k3 = exp(log r) - 1 - log r``, ``log r = log ref - log pi`` (unbiased, non-negative,
    gradient ``1 - ref / pi`` per token). The caller scales it by its coefficient
    ``beta`` and adds it to the policy loss. The gradient flows to ``logprobs`` only
    (``ref_logprobs`` is detached); positions outside the mask are zeroed before the
    estimator, so ``inf``/``nan`` there reach neither the loss nor the gradient.

    Args:
        logprobs: ``(B, A)`` log-probs of the sampled tokens under the current policy.
        ref_logprobs: ``(B, A)`` the same under the frozen reference.
        mask: ``(B, A)`` 1 on response tokens.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.
        aggregate: ``(x, mask) -> scalar`` reduction; default the token mean.

    Returns:
        ``(loss, {"kl"})``; ``kl`` is the aggregated estimate (the loss, detached).
    """
    m = mask.bool()
    logp = torch.where(m, logprobs, torch.zeros_like(logprobs))  # (B, A)
    ref = torch.where(m, ref_logprobs.detach(), torch.zeros_like(logprobs))  # (B, A)
    loss = aggregate(kl_per_token(logp, ref, estimator), m)
    return loss, {"kl": loss.detach()}
