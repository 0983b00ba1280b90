"""Sample a policy on prompts and score each response: length, EOS, KL to a reference, proxy reward.

:func:`sample_and_score` is the one sampling-and-scoring pass shared by the offline
comparison (``rlhf-lightning evaluate``) and the training-time callback
(:class:`~rlhf_lightning.eval.callback.GoldRewardEval`). Its order of operations is
fixed: sample (the only step that draws random numbers), then the reference's
log-probs, then the policy's, then the reward model, so a run with the callback
consumes the global torch RNG exactly as sampling alone would.

The KL is the Monte-Carlo estimate of ``KL(pi || pi_ref)`` for one sample ``y ~ pi``:
``sum_t log pi(y_t) - log pi_ref(y_t)`` over the response tokens (EOS included), both
log-probs at the same temperature (the sampling temperature unless told otherwise).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf_lightning.generation import SamplingConfig, decode_responses, sample_responses
from rlhf_lightning.models import (
    disable_dropout,
    freeze,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    response_logprobs,
)

log = logging.getLogger(__name__)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block, then restore its previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def sequence_log_ratio(
    policy: nn.Module,
    reference: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    response_start: int,
    response_mask: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """``(B,)`` sum over response tokens of ``log pi(y_t) - log pi_ref(y_t)``.

    The reference is scored first, then the policy (both in eval mode); a policy that
    *is* the reference reuses its log-probs, so its KL is exactly 0.

    Args:
        ids: ``(B, Q+A)`` left-padded query followed by the right-padded response.
        mask: ``(B, Q+A)`` 1 on real tokens.
        response_start: ``Q``, the query width.
        response_mask: ``(B, A)`` 1 on real response tokens (EOS included).
    """
    with eval_mode(reference):
        ref_logp = response_logprobs(reference, ids, mask, response_start, temperature).logprobs  # (B, A)
    if policy is reference:
        logp = ref_logp  # (B, A)
    else:
        with eval_mode(policy):
            logp = response_logprobs(policy, ids, mask, response_start, temperature).logprobs  # (B, A)
    return ((logp - ref_logp) * response_mask).sum(-1)  # (B,)


@torch.no_grad()
def sample_and_score(
    policy: nn.Module,
    reference: nn.Module | None,
    reward_model: nn.Module | None,
    tokenizer: Any,
    batch: dict[str, Any],
    sampling: SamplingConfig,
    temperature: float | None = None,
) -> list[dict[str, Any]]:
    """Sample one response per (left-padded) prompt of ``batch`` and measure it.

    Args:
        policy: the causal LM sampled from.
        reference: the KL reference (None: no KL is measured).
        reward_model: a scorer ``(ids, mask) -> (B,)`` read at the last real token
            (None: no proxy reward).
        tokenizer: gives the EOS and pad ids and decodes the responses.
        batch: ``input_ids`` and ``attention_mask`` ``(B, Q)`` left-padded, ``prompts``
            (``PromptCollator``'s output).
        sampling: the sampling settings (one ``sample_responses`` call per batch).
        temperature: of the log-probs behind the KL; default ``sampling.temperature``.

    Returns:
        One record per prompt: ``prompt``, ``response`` (text without EOS), ``length``
        (response tokens, EOS included), ``ended`` (an EOS was sampled), ``kl`` and
        ``proxy`` (floats, or None when not measured).
    """
    q_ids, q_mask = batch["input_ids"], batch["attention_mask"]  # (B, Q)
    gen = sample_responses(policy, q_ids, q_mask, tokenizer.eos_token_id, tokenizer.pad_token_id, sampling)
    ids = torch.cat([q_ids, gen.response_ids], 1)  # (B, Q+A)
    mask = torch.cat([q_mask, gen.response_mask], 1)  # (B, Q+A)
    B, Q = q_ids.shape
    kl: list[float | None] = [None] * B
    if reference is not None:
        t = temperature or sampling.temperature
        kl = sequence_log_ratio(policy, reference, ids, mask, Q, gen.response_mask, t).tolist()  # (B,)
    proxy = reward_model(ids, mask).float().tolist() if reward_model is not None else [None] * B  # (B,)
    texts = decode_responses(tokenizer, gen)
    return [
        {"prompt": p, "response": r, "length": int(n), "ended": bool(e), "kl": k, "proxy": s}
        for p, r, n, e, k, s in zip(
            batch["prompts"], texts, gen.lengths.tolist(), gen.ended.tolist(), kl, proxy, strict=True
        )
    ]


# ----------------------------------------------------------------------------- frozen models for scoring


def check_same_vocab(tokenizer: Any, path: str, what: str) -> None:
    """The policy, reference and reward model must share token ids (KL and scoring use ids directly).

    An export without tokenizer files is trusted (a warning is logged).
    """
    try:
        other = load_tokenizer(path)
    except (OSError, ValueError) as err:
        log.warning("could not load a tokenizer from %s %s (%s); assuming it matches", what, path, err)
        return
    if other.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"the tokenizer of {what} {path} differs from the reference's; "
            "policies, reference and reward model must share one vocabulary"
        )


def load_frozen_lm(path: str, tokenizer: Any) -> nn.Module:
    """A causal LM export for scoring: dropout off, eval mode, no gradients."""
    return freeze(disable_dropout(load_causal_lm(path, tokenizer)))


def load_frozen_reward_model(path: str) -> nn.Module:
    """A reward-model export (its stored normalisation applied): dropout off, eval mode, no gradients."""
    return freeze(disable_dropout(load_reward_model(path)))


def to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """The batch with its tensors moved to ``device`` (other values as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def write_result(out_dir: str | Path, name: str, result: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """``<out_dir>/<name>.json`` (the result) and ``<out_dir>/<name>_samples.jsonl`` (one record a line)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    with (out / f"{name}_samples.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    log.info("wrote %s and %s", out / f"{name}.json", out / f"{name}_samples.jsonl")
