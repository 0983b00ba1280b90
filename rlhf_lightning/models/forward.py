"""Forward passes shared by every stage: positions under padding, and response log-probs.

:func:`response_logprobs` is the one place where a causal LM scores the response part
of query+response sequences: PPO's rollout and learning passes, the reference model,
DPO's policy and reference, and the evaluation all call it, so temperature, shifting,
position ids and the skipping of prompt logits are decided once.

By default it never builds the ``(B, T, V)`` logits: it runs the model's decoder for the
last hidden states and computes log-probs and entropy from them and the LM head in
chunks of rows (:func:`~rlhf_lightning.logprobs.chunked_token_logprobs`). A model whose
logits are not ``head(hidden)`` (optionally soft-capped) is detected once, by comparing
both ways on a few tokens, and keeps the plain path.

A model sharded with FSDP2 gathers its embeddings, final norm and head only in its own
forward, so there the split runs inside a method of the model registered as an FSDP2
forward (``register_fsdp_forward_method``): the same gathering, the same chunks.
"""

from __future__ import annotations

import functools
import inspect
import logging
import types
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from rlhf_lightning.logprobs import chunked_token_logprobs, entropy_from_logits, token_logprobs
from rlhf_lightning.models.sharding import full_parameters, is_sharded

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = "auto"  # rows of logits at a time: "auto", an int, or None (the full logits)
LOGITS_PER_CHUNK = 2**25  # "auto": rows x V about this (128 MiB of float32): 261 rows at V = 128k, 8192 at 4k


def chunk_rows(chunk_size: int | str, vocab_size: int) -> int:
    """Rows per chunk: ``chunk_size`` itself, or for ``"auto"`` as many as fit ``LOGITS_PER_CHUNK`` logits."""
    if chunk_size == "auto":
        return max(1, LOGITS_PER_CHUNK // vocab_size)
    if isinstance(chunk_size, str) or chunk_size < 1:
        raise ValueError(f"chunk_size must be 'auto', a positive int or None, got {chunk_size!r}")
    return chunk_size


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


@dataclass(frozen=True)
class LinearHead:
    """A causal LM split as ``logits = softcap(head(decoder(...).last_hidden_state))``."""

    decoder: nn.Module
    head: nn.Linear
    softcap: float | None


# model -> whether its split reproduces its logits (checked on first use)
_REPRODUCES: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _split_head(model: nn.Module) -> LinearHead | None:
    """Decoder, LM head and soft-capping of a ``transformers`` causal LM (or a PEFT wrapper of one)."""
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    # An adapter or a sharding wrapper around the head is not a plain nn.Linear: keep the plain path.
    if decoder is None or decoder is model or type(head) is not nn.Linear:
        return None
    # A partitioned (ZeRO-3) weight; FSDP2's sharded weights keep their full shape.
    if head.weight.shape != (head.out_features, head.in_features):
        return None
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    return LinearHead(decoder, head, float(softcap) if softcap else None)


@torch.no_grad()
def _reproduces_logits(model: nn.Module, split: LinearHead, input_ids: torch.Tensor) -> bool:
    """Whether ``split`` gives the model's own logits on the first few tokens of ``input_ids``."""
    ids = input_ids[:1, :16]  # (1, n)
    mask = torch.ones_like(ids)
    training = model.training
    model.eval()  # dropout would make the two passes differ
    try:
        plain = causal_lm_logits(model, ids, mask).float()  # (1, n, V)
        hidden = split.decoder(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
        ours = split.head(hidden.last_hidden_state).float()  # (1, n, V)
    except (TypeError, ValueError, AttributeError):
        return False
    finally:
        model.train(training)
    if split.softcap is not None:
        ours = torch.tanh(ours / split.softcap) * split.softcap
    return plain.shape == ours.shape and bool((plain - ours).abs().max() <= 1e-2 * (1 + plain.abs().max()))


def linear_head(model: nn.Module, input_ids: torch.Tensor) -> LinearHead | None:
    """The model's decoder/head split when it reproduces its logits (checked once per model), else None."""
    split = _split_head(model)
    if split is None:
        return None
    if model not in _REPRODUCES:
        # Sharded: every rank gathers the weights for the check (its first forward, on every
        # rank) and the ranks agree on the answer, so all of them take the same path.
        with full_parameters(model):
            ok = _reproduces_logits(model, split, input_ids)
        if is_sharded(model):
            flag = torch.tensor([int(ok)], device=split.head.weight.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            ok = bool(flag.item())
        _REPRODUCES[model] = ok
        if not _REPRODUCES[model]:
            log.warning("%s: logits are not head(hidden states); log-probs use the full logits", type(model).__name__)
    return split if _REPRODUCES[model] else None


def _split_logprobs(
    split: LinearHead,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_start: int,
    labels: torch.Tensor,
    temperature: float,
    rows: int,
    with_entropy: bool,
    with_hidden: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(B*A,)`` log-probs, entropy (or None) and ``(B, A, H)`` hidden states (or None) through the split."""
    out = split.decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    hidden = out.last_hidden_state[:, response_start - 1 : -1]  # (B, A, H)
    logps, entropy = chunked_token_logprobs(
        hidden.reshape(-1, hidden.shape[-1]),  # (B*A, H)
        split.head.weight,
        labels.reshape(-1),
        split.head.bias,
        temperature,
        split.softcap,
        rows,
        with_entropy,
    )
    return logps, entropy, hidden if with_hidden else None


_SHARDED_SPLIT = "rlhf_split_logprobs"  # the method name on a sharded model


def _sharded_split_method(model: nn.Module):
    """:func:`_split_logprobs` as a method of the FSDP2 root ``model``, registered so that calling
    it gathers the root's weights (embeddings, final norm, head) as its forward does, and its
    backward reduce-scatters their gradients. Registered on first use (every rank alike)."""
    method = model.__dict__.get(_SHARDED_SPLIT)
    if method is None:
        from torch.distributed.fsdp import register_fsdp_forward_method

        def split_logprobs(self, *args):
            return _split_logprobs(*args)

        model.__dict__[_SHARDED_SPLIT] = types.MethodType(split_logprobs, model)
        register_fsdp_forward_method(model, _SHARDED_SPLIT)
        method = model.__dict__[_SHARDED_SPLIT]
    return method


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
    chunk_size: int | str | None = DEFAULT_CHUNK_SIZE,
    targets: torch.Tensor | None = None,
) -> ResponseOutputs:
    """Log-probs of the tokens ``input_ids[:, response_start:]`` given everything before them.

    Works for both layouts used here: rollouts (a left-padded query of width ``Q``
    followed by a right-padded response, ``response_start = Q``) and training batches
    (right-padded prompt+response, ``response_start`` = the first column holding a
    response token in any row; the caller masks prompt and pad columns after it).
    Logits are taken at the sampling ``temperature`` (ratios and KL must refer to the
    policy that sampled) and position ids come from the mask. With ``chunk_size`` (the
    default) and a model whose logits are a linear head on its decoder's last hidden
    states, the head runs on the ``A`` scoring positions ``chunk_size`` rows at a time
    and the ``(B, A, V)`` logits never exist (:func:`linear_head`); otherwise the LM head
    runs only on the ``A + 1`` last positions when the model accepts ``logits_to_keep``.

    Args:
        model: a causal LM (``transformers`` or anything returning ``.logits``).
        input_ids: ``(B, T)`` query+response token ids.
        attention_mask: ``(B, T)`` 1 on real tokens.
        response_start: column of the first scored token (at least 1).
        temperature: logits are divided by it before the softmax.
        with_entropy: also return the per-position entropy (a statistic: no graph).
        with_hidden: also return the last layer's hidden states (for a value head).
        chunk_size: rows of logits per chunk, ``"auto"`` (:func:`chunk_rows`), or None for
            the full logits.
        targets: ``(B, T)`` token ids to score instead of ``input_ids`` (same columns).

    Returns:
        :class:`ResponseOutputs` with ``(B, A)`` tensors, ``A = T - response_start``.
    """
    T = input_ids.shape[1]
    if not 1 <= response_start <= T:
        raise ValueError(f"response_start must be in [1, {T}], got {response_start}")
    labels = (input_ids if targets is None else targets)[:, response_start:]  # (B, A)
    split = linear_head(model, input_ids) if chunk_size else None
    if split is not None:
        run = _sharded_split_method(model) if is_sharded(model) else _split_logprobs
        rows = chunk_rows(chunk_size, split.head.out_features)
        logps, entropy, hidden = run(split, input_ids, attention_mask, response_start, labels, temperature, rows,
                                     with_entropy, with_hidden)  # fmt: skip
        return ResponseOutputs(
            logprobs=logps.view(labels.shape),
            entropy=None if entropy is None else entropy.view(labels.shape),
            hidden=hidden,
        )
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
    result = ResponseOutputs(logprobs=token_logprobs(logits, labels, temperature))
    if with_entropy:
        with torch.no_grad():
            result.entropy = entropy_from_logits(logits.detach().float() / temperature)  # (B, A)
    if with_hidden:
        result.hidden = out.hidden_states[-1][:, response_start - 1 : -1]  # (B, A, H)
    return result
