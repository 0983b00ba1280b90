"""Our decode loop: KV cache, the LM head on the last position, inverse-CDF draws.

It samples exactly the distribution ``model.generate`` samples (temperature, then top-k,
then top-p, as ``transformers`` defines them): see ``tests/test_generation.py``.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import TYPE_CHECKING

import torch
from torch import nn

from rlhf_lightning.models.forward import position_ids_from_mask

if TYPE_CHECKING:
    from rlhf_lightning.generation import SamplingConfig


@torch.inference_mode()
def decode_loop(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    eos_token_id: int | None,
    pad_token_id: int,
    cfg: SamplingConfig,
    cache: str = "auto",
    attention: str = "auto",
) -> torch.Tensor:
    """Our decode loop over the KV cache: the ``(B, A)`` new tokens (pad after a row's EOS).

    One prefill over the left-padded prompts, then one single-token forward per step,
    position ids counted over real tokens (:func:`position_ids_from_mask`). Each step:
    EOS masked out before ``min_new_tokens``, then :func:`warp_logits` and
    :func:`draw_tokens` (or argmax when greedy). A row that samples EOS emits pad from
    then on; once a quarter of the batch has ended, ended rows leave the batch (and the
    cache), so they stop costing forwards. The loop stops when every row has ended or
    ``max_new_tokens`` are spent, so ``A <= max_new_tokens``.

    Args:
        cache: ``"static"`` (preallocated), ``"dynamic"`` (grown per step) or ``"auto"``:
            dynamic on the CPU (on an idle 2-core CPU, batch 16: 1.28-1.36x HF against
            1.16-1.20x static; batch 64 within noise: ``scripts/bench_generate.py
            --variants``), static on accelerators where the model supports it (no
            per-step reallocation).
        attention: ``"model"`` keeps the model's attention implementation; ``"auto"``
            runs the one-query decode steps of an SDPA model on CPU through its eager
            attention (measured faster than SDPA's CPU kernel there), prefill unchanged.
    """
    B, Q = input_ids.shape
    N = cfg.max_new_tokens
    device = input_ids.device
    out = torch.full((B, N), pad_token_id, dtype=torch.long, device=device)  # (B, N)
    mask = torch.cat([attention_mask, attention_mask.new_ones(B, N)], dim=1)  # (B, Q + N) sliced as tokens come
    positions = position_ids_from_mask(attention_mask)  # (B, Q)
    step = _Stepper(model, _new_cache(model, Q + N, cache, device))
    logits = step(input_ids, mask[:, :Q], positions)  # (B, V)
    next_pos = positions[:, -1:] + 1  # (b, 1) position of the token each live row samples next
    rows = torch.arange(B, device=device)  # (b,) the batch row of each live row
    ended = torch.zeros(B, dtype=torch.bool, device=device)  # (b,) sampled EOS, not yet dropped
    width = N
    with _decode_attention(model, device, attention):
        for t in range(N):
            if eos_token_id is not None and t < cfg.min_new_tokens:
                logits[:, eos_token_id] = -float("inf")
            if cfg.do_sample:
                tokens = draw_tokens(warp_logits(logits, cfg.temperature, cfg.top_k, cfg.top_p))  # (b,)
            else:
                tokens = logits.argmax(-1)  # (b,)
            tokens.masked_fill_(ended, pad_token_id)
            out[rows, t] = tokens
            if eos_token_id is not None:
                ended |= tokens == eos_token_id
                n_ended = int(ended.sum())
                if n_ended == len(rows):
                    width = t + 1
                    break
                if n_ended * 4 >= len(rows) and t < N - 2:  # drop ended rows: one copy of the cache, cheaper steps
                    keep = (~ended).nonzero().squeeze(1)  # (b',)
                    step.cache.reorder_cache(keep)
                    rows, tokens, next_pos, mask, ended = (x[keep] for x in (rows, tokens, next_pos, mask, ended))
            if t == N - 1:
                break
            logits = step(tokens[:, None], mask[:, : Q + t + 1], next_pos)  # (b, V)
            next_pos = next_pos + 1
    return out[:, :width].clone()  # a normal tensor, usable outside inference mode


@contextlib.contextmanager
def _decode_attention(model: nn.Module, device: torch.device, attention: str):
    if attention not in ("auto", "model"):
        raise ValueError(f"attention must be 'auto' or 'model', got {attention!r}")
    config = model.config
    before = config._attn_implementation
    switch = (
        attention == "auto"
        and device.type == "cpu"
        and before == "sdpa"
        and getattr(model, "_can_set_attn_implementation", lambda: False)()
    )
    if switch:
        config._attn_implementation = "eager"  # read at every forward; the setter reaches sub-configs
    try:
        yield
    finally:
        if switch:
            config._attn_implementation = before


class _Stepper:
    """One forward with the cache: the float32 next-token logits ``(b, V)`` of the last position."""

    def __init__(self, model: nn.Module, cache):
        self.model, self.cache = model, cache
        params = inspect.signature(model.forward).parameters
        self.kwargs = {"cache" if "cache" in params else "past_key_values": cache, "use_cache": True}
        if "logits_to_keep" in params:  # the LM head runs on the last position only
            self.kwargs["logits_to_keep"] = 1

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **self.kwargs)
        return out.logits[:, -1].float()  # (b, V)


def _new_cache(model: nn.Module, max_len: int, kind: str, device: torch.device):
    from transformers import DynamicCache, StaticCache

    if kind == "auto":
        static = device.type != "cpu" and getattr(model, "_can_compile_fullgraph", False)
        kind = "static" if static else "dynamic"
    if kind == "static":
        return StaticCache(config=model.config, max_cache_len=max_len)
    if kind == "dynamic":
        return DynamicCache(config=model.config)
    raise ValueError(f"cache must be 'auto', 'static' or 'dynamic', got {kind!r}")


# ----------------------------------------------------------------------------- sampling maths
def warp_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then top-p: ``generate``'s warpers, in its order; filtered logits are ``-inf``.

    As ``transformers`` defines them: top-k keeps every token whose logit is at least
    the k-th largest (ties included); top-p sorts ascending and removes the tokens whose
    cumulative probability is ``<= 1 - top_p``, always keeping the most likely one
    (``min_tokens_to_keep=1``). ``top_k=0`` and ``top_p=1`` switch them off.

    Args:
        logits: ``(B, V)`` next-token logits (float32).
    """
    if temperature != 1.0:
        logits = logits / temperature  # (B, V)
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)  # (B, V)
        remove = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p  # (B, V) in sorted order
        remove[:, -1:] = False
        logits = logits.masked_fill(remove.scatter(1, order, remove), -float("inf"))
    return logits


def draw_tokens(logits: torch.Tensor) -> torch.Tensor:
    """One token per row from ``softmax(logits)`` by inverse CDF: ``(B,)`` ids.

    One uniform ``u`` in ``(0, 1]`` per row from torch's global generator, scaled by the
    row's total weight; the token is the first index whose cumulative weight reaches it,
    so a token of probability 0 (a ``-inf`` logit) is never drawn. The cumulative sum
    runs in float64 so that rounding cannot move mass between tokens (float32 loses the
    increments of tokens below ~1e-7 once the sum nears 1).

    Args:
        logits: ``(B, V)``; at least one finite entry per row (a NaN row raises the error
            ``torch.multinomial`` gives, which :func:`sample_responses` explains).
    """
    weights = (logits - logits.amax(-1, keepdim=True)).exp_()  # (B, V) unnormalised probabilities
    cdf = weights.to(torch.float64).cumsum_(-1)  # (B, V)
    u = 1.0 - torch.rand(logits.shape[0], 1, dtype=torch.float64, device=logits.device)  # (B, 1) in (0, 1]
    tokens = torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(1)  # (B,)
    if bool((tokens >= logits.shape[-1]).any()):  # only a NaN total puts u * total past the last entry
        raise RuntimeError("probability tensor contains either inf, nan or element < 0 (non-finite logits)")
    return tokens
