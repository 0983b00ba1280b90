"""Forward passes shared by every stage: positions under padding, and response log-probs.

:func:`response_logprobs` is the one place where a causal LM scores the response part
of query+response sequences: PPO's rollout and learning passes, the reference model,
DPO's policy and reference, and the evaluation all call it, so temperature, shifting,
position ids and the skipping of prompt logits are decided once.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from rlhf_lightning.logprobs import entropy_from_logits, token_logprobs


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


def causal_lm_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
    """Logits of a causal LM under any padding, with position ids derived from the mask."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        **kwargs,
    )
    return out.logits  # (B, T, V)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (works for left and right padding)."""
    T = attention_mask.shape[-1]
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)  # (B, T)
    return (positions * attention_mask.long()).argmax(-1)  # (B,)


@functools.cache
def _takes_logits_to_keep(forward_type: type) -> bool:
    return "logits_to_keep" in inspect.signature(forward_type.forward).parameters


@dataclass
class ResponseOutputs:
    """What :func:`response_logprobs` returns; ``A = T - response_start`` scored columns."""

    logprobs: torch.Tensor  # (B, A) float32 log-probs of the scored tokens (with grad when the model has)
    entropy: torch.Tensor | None = None  # (B, A) float32 entropy of the next-token distribution, no grad
    hidden: torch.Tensor | None = None  # (B, A, H) last hidden states at the positions predicting each token


def response_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_start: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    with_hidden: bool = False,
) -> ResponseOutputs:
    """Log-probs of the tokens ``input_ids[:, response_start:]`` given everything before them.

    Works for both layouts used here: rollouts (a left-padded query of width ``Q``
    followed by a right-padded response, ``response_start = Q``) and training batches
    (right-padded prompt+response, ``response_start`` = the first column holding a
    response token in any row; the caller masks prompt and pad columns after it).
    Logits are taken at the sampling ``temperature`` (ratios and KL must refer to the
    policy that sampled), position ids come from the mask, and the LM head runs only
    on the ``A + 1`` last positions when the model accepts ``logits_to_keep``.

    Args:
        model: a causal LM (``transformers`` or anything returning ``.logits``).
        input_ids: ``(B, T)`` query+response token ids.
        attention_mask: ``(B, T)`` 1 on real tokens.
        response_start: column of the first scored token (at least 1).
        temperature: logits are divided by it before the softmax.
        with_entropy: also return the per-position entropy (a statistic: no graph).
        with_hidden: also return the last layer's hidden states (for a value head).

    Returns:
        :class:`ResponseOutputs` with ``(B, A)`` tensors, ``A = T - response_start``.
    """
    T = input_ids.shape[1]
    if not 1 <= response_start <= T:
        raise ValueError(f"response_start must be in [1, {T}], got {response_start}")
    kwargs = {"output_hidden_states": True} if with_hidden else {}
    keep = _takes_logits_to_keep(type(model))
    if keep:
        kwargs["logits_to_keep"] = T - response_start + 1  # the positions predicting response tokens, +1
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        **kwargs,
    )
    logits = out.logits[:, :-1] if keep else out.logits[:, response_start - 1 : -1]  # (B, A, V)
    result = ResponseOutputs(logprobs=token_logprobs(logits, input_ids[:, response_start:], temperature))
    if with_entropy:
        with torch.no_grad():
            result.entropy = entropy_from_logits(logits.detach().float() / temperature)  # (B, A)
    if with_hidden:
        result.hidden = out.hidden_states[-1][:, response_start - 1 : -1]  # (B, A, H)
    return result
