"""Batched sampling from a causal LM: left-padded prompts, KV cache, stop at EOS, mask after EOS.

PPO rollouts, ``rlhf-lightning predict`` and evaluation all sample through
``sample_responses`` so they share one set of settings and one masking rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn


@dataclass
class SamplingConfig:
    """Sampling settings. ``temperature`` is also the one log-probs are recomputed at in PPO."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    do_sample: bool = True
    min_new_tokens: int = 0


def warn_if_truncated(cfg: SamplingConfig, method: str) -> None:
    """Warn when an on-policy method samples from a truncated (top-k, top-p) or greedy distribution.

    Log-probs, ratios and the KL are computed under the full softmax at the sampling
    temperature, so such samples make the update off-policy and the KL misestimated.
    """
    if not cfg.do_sample or cfg.top_k or cfg.top_p < 1.0:
        rank_zero_warn(
            f"{method} sampling with do_sample={cfg.do_sample}, top_k={cfg.top_k}, top_p={cfg.top_p}: responses come "
            "from a truncated (or greedy) distribution, while log-probs, ratios and the KL are computed under the full "
            "softmax, so the update is off-policy and the KL is misestimated. Use do_sample=true, top_k=0, "
            "top_p=1.0 unless that is what you want."
        )


@dataclass
class Generation:
    """Sampled responses aligned to their (left-padded) prompts."""

    response_ids: torch.Tensor  # (B, A) right-padded: every token after the first EOS is pad
    response_mask: torch.Tensor  # (B, A) 1 on real response tokens, EOS included
    ended: torch.Tensor  # (B,) bool: an EOS was sampled within the budget

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)  # (B,)


def mask_after_eos(response_ids: torch.Tensor, eos_token_id: int, pad_token_id: int) -> Generation:
    """Keep each row up to and including its first EOS; replace the rest by pad.

    Args:
        response_ids: ``(B, A)`` sampled tokens.
    """
    is_eos = response_ids == eos_token_id  # (B, A)
    # Number of EOS seen strictly before each position: a token is real while it is 0.
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()  # (B, A)
    mask = (eos_before == 0).long()  # (B, A)
    ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad_token_id))
    return Generation(response_ids=ids, response_mask=mask, ended=is_eos.any(-1))


@torch.no_grad()
def sample_responses(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    eos_token_id: int,
    pad_token_id: int,
    config: SamplingConfig | None = None,
) -> Generation:
    """Sample continuations for a batch of LEFT-padded prompts with ``model.generate``.

    Uses the KV cache and stops once every row has produced EOS (or the budget is spent).
    Position ids come from the attention mask, so padding does not shift positions.

    Args:
        input_ids: ``(B, Q)`` left-padded prompt ids.
        attention_mask: ``(B, Q)``.

    Returns:
        ``Generation`` with responses of width ``A <= max_new_tokens``.
    """
    cfg = config or SamplingConfig()
    if cfg.do_sample and cfg.temperature <= 0:
        raise ValueError("temperature must be > 0 when sampling; use do_sample=False for greedy decoding")
    if attention_mask[:, -1].min() == 0:
        raise ValueError("prompts must be left-padded for generation (found padding at the end)")
    kwargs = dict(
        max_new_tokens=cfg.max_new_tokens,
        min_new_tokens=cfg.min_new_tokens or None,
        do_sample=cfg.do_sample,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        use_cache=True,
        return_dict_in_generate=False,
    )
    if cfg.do_sample:
        kwargs.update(temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=cfg.top_p)
    else:
        kwargs.update(temperature=None, top_k=None, top_p=None)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    finally:
        model.train(was_training)
    response = out[:, input_ids.shape[1] :]  # (B, A)
    return mask_after_eos(response, eos_token_id, pad_token_id)


def decode_responses(tokenizer, gen: Generation) -> list[str]:
    """Response texts without EOS or padding."""
    texts = []
    for ids, mask in zip(gen.response_ids.tolist(), gen.response_mask.tolist()):
        keep = [t for t, m in zip(ids, mask) if m and t != tokenizer.eos_token_id]
        texts.append(tokenizer.decode(keep, skip_special_tokens=True))
    return texts


# Systems store their SamplingConfig in hyperparameters; let checkpoints load with weights_only=True.
torch.serialization.add_safe_globals([SamplingConfig])
