"""Batched sampling from a causal LM: left-padded prompts, KV cache, stop at EOS, mask after EOS.

PPO rollouts, ``rlhf-lightning predict`` and evaluation all sample through
``sample_responses`` so they share one set of settings and one masking rule.

Two engines sample the same distribution (temperature, then top-k, then top-p, as
``transformers``' ``generate`` defines them):

* :func:`decode_loop` (``decode.py``, the default, ``engine="auto"``), our own loop over the model's KV cache: no
  logits-processor lists, the LM head on the last position only, one uniform per row
  drawn through the inverse CDF, rows that have ended dropped from the batch, a static
  cache, and on CPU the model's eager attention for one-query steps;
* :func:`hf_generate`, ``model.generate`` (``engine="hf"``), also for what the loop does
  not handle (:func:`fast_loop_unsupported` decides, in one place).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from rlhf_lightning.generation.decode import decode_loop, draw_tokens, warp_logits  # noqa: F401 (public names)
from rlhf_lightning.models.sharding import full_parameters

ENGINES = ("auto", "hf")


@dataclass
class SamplingConfig:
    """Sampling settings. ``temperature`` is also the one log-probs are recomputed at in PPO.

    ``engine``: ``"auto"`` samples with :func:`decode_loop` wherever it applies (see
    :func:`fast_loop_unsupported`) and with ``model.generate`` elsewhere; ``"hf"`` always
    uses ``model.generate``. Both sample the same distribution (tested), but not the same
    draws for a seed. ``"auto"`` is the default: on an idle 2-core CPU the loop makes 1.24x
    (batch 16) and 1.39x (batch 64) HF's new tokens per second (``scripts/bench_generate.py``).
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    do_sample: bool = True
    min_new_tokens: int = 0
    engine: str = "auto"


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
    """Sample continuations for a batch of LEFT-padded prompts.

    Uses the KV cache and stops once every row has produced EOS (or the budget is spent).
    Position ids come from the attention mask, so padding does not shift positions. The
    engine is :func:`decode_loop` unless :func:`fast_loop_unsupported` gives a reason,
    then ``model.generate`` (:func:`hf_generate`).

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
    was_training = model.training
    model.eval()
    try:
        # FSDP2: every rank gathers the full weights once, so decoding (which stops when this
        # rank's rows end) runs no collective; a model that is not sharded is left as it is.
        with full_parameters(model):
            engine = hf_generate if fast_loop_unsupported(model, cfg) else decode_loop
            response = engine(model, input_ids, attention_mask, eos_token_id, pad_token_id, cfg)  # (B, A)
    except RuntimeError as err:
        if "probability tensor contains" not in str(err):
            raise
        raise FloatingPointError(
            "sampling failed: the policy produced non-finite logits (inf or NaN), so its weights or inputs "
            "diverged; resume from an earlier checkpoint with a lower learning rate"
        ) from err
    finally:
        model.train(was_training)
    return mask_after_eos(response, eos_token_id, pad_token_id)


# ----------------------------------------------------------------------------- which engine
# generation_config entries that leave the sampled distribution alone (ids, caching, outputs, beam-only knobs);
# temperature, top_k, top_p, do_sample, min_new_tokens and max_new_tokens are always passed explicitly.
_NEUTRAL_GENERATION_KEYS = {
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "decoder_start_token_id",
    "max_length",
    "max_new_tokens",
    "min_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "use_cache",
    "cache_implementation",
    "cache_config",
    "max_cache_len",
    "compile_config",
    "disable_compile",
    "prefill_chunk_size",
    "output_attentions",
    "output_hidden_states",
    "output_scores",
    "output_logits",
    "return_dict_in_generate",
    "renormalize_logits",
    "remove_invalid_values",
    "early_stopping",
    "length_penalty",
    "low_memory",
    "transformers_version",
    "_from_model_config",
}
# Their values that change nothing (anything else in a model's generation_config sends it to model.generate).
_NEUTRAL_VALUES = {
    "num_beams": 1,
    "num_return_sequences": 1,
    "min_length": 0,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
}


def fast_loop_unsupported(model: nn.Module, cfg: SamplingConfig) -> str | None:
    """Why :func:`decode_loop` cannot sample for ``model`` and ``cfg``; ``None`` when it can.

    The loop needs a decoder-only ``transformers`` model whose forward takes an attention
    mask, position ids and a ``Cache``, unsharded parameters (under FSDP v1 or ZeRO-3 every
    rank must run the same number of forwards, which ``generate`` synchronises; FSDP2
    weights are gathered by :func:`sample_responses` first), and no
    logits processing beyond temperature / top-k / top-p / ``min_new_tokens`` (a
    ``generation_config`` asking for, say, a repetition penalty goes to ``generate``).
    """
    if cfg.engine not in ENGINES:
        raise ValueError(f"unknown sampling engine {cfg.engine!r}; expected one of {ENGINES}")
    if cfg.engine == "hf":
        return "engine='hf' was asked for"
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "generate"):
        return f"{type(model).__name__} is not a transformers generative model"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder model"
    supports_cache = getattr(model, "_supports_default_dynamic_cache", None)
    if supports_cache is None or not supports_cache():
        return f"{type(model).__name__} does not use transformers Cache objects"
    params = set(inspect.signature(model.forward).parameters)
    missing = {"attention_mask", "position_ids"} - params
    if missing or not {"cache", "past_key_values"} & params:
        return f"{type(model).__name__}.forward takes no {sorted(missing) or 'cache'} argument"
    if _sharded(model):
        return "parameters are sharded across ranks (FSDP / ZeRO-3): generate synchronises the ranks"
    extras = _generation_config_extras(model)
    if extras:
        return f"model.generation_config asks for logits processing the loop does not do: {extras}"
    return None


def _sharded(model: nn.Module) -> bool:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    if torch.distributed.get_world_size() == 1:
        return False
    from torch.distributed.tensor import DTensor

    wrapped = any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules())
    return wrapped or any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters())


def _generation_config_extras(model: nn.Module) -> list[str]:
    gc = getattr(model, "generation_config", None)
    if gc is None:
        return []
    return sorted(
        k
        for k, v in gc.to_diff_dict().items()
        if k not in _NEUTRAL_GENERATION_KEYS and v is not None and _NEUTRAL_VALUES.get(k, object()) != v
    )


# ----------------------------------------------------------------------------- the engines
def hf_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    eos_token_id: int,
    pad_token_id: int,
    cfg: SamplingConfig,
) -> torch.Tensor:
    """``model.generate`` with ``cfg``: the ``(B, A)`` new tokens (pad after a row's EOS).

    Every setting of ``cfg`` is passed explicitly (``None`` overrides the model's
    ``generation_config`` too: ``top_k=None`` is no top-k, not its default of 50).
    """
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
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return out[:, input_ids.shape[1] :]  # (B, A)


def decode_responses(tokenizer, gen: Generation) -> list[str]:
    """Response texts without EOS or padding."""
    texts = []
    for ids, mask in zip(gen.response_ids.tolist(), gen.response_mask.tolist(), strict=True):
        keep = [t for t, m in zip(ids, mask, strict=True) if m and t != tokenizer.eos_token_id]
        texts.append(tokenizer.decode(keep, skip_special_tokens=True))
    return texts


# Systems store their SamplingConfig in hyperparameters; let checkpoints load with weights_only=True.
torch.serialization.add_safe_globals([SamplingConfig])
