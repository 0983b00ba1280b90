"""Tokenising examples and padding them into batches (pure functions and small callables).

Conventions (see DESIGN.md): EOS is appended to every SFT, chosen and rejected response;
prompts are truncated from the left (keeping the text next to the response), responses
from the right; training batches are right-padded, generation batches left-padded; label
``-100`` marks tokens outside the loss (prompt and padding).
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf_lightning.data.records import PreferenceExample, PromptExample, SFTExample

IGNORE_INDEX = -100


def _prompt_ids(prompt: str, tokenizer: Any, max_prompt_length: int) -> tuple[list[int], bool]:
    """Token ids of ``prompt`` with special tokens, left-truncated to ``max_prompt_length``.

    A leading BOS survives truncation (the model was trained to see it first), and a
    doubled BOS (chat templates that already write one) is collapsed to one. An EOS that
    the tokenizer appends to every text (``add_eos_token``) is dropped: the response
    follows the prompt, it does not end the sequence.
    """
    if max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is not None and len(ids) >= 2 and ids[0] == ids[1] == bos:
        ids = ids[1:]
    if eos is not None and len(ids) >= 2 and ids[-1] == eos:
        plain = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if ids[-1 - len(plain) : -1] == plain:  # this EOS is the tokenizer's, not the prompt's own text
            ids = ids[:-1]
    if len(ids) <= max_prompt_length:
        return ids, False
    if bos is not None and ids[0] == bos and max_prompt_length > 1:
        return [bos] + ids[len(ids) - max_prompt_length + 1 :], True
    return ids[-max_prompt_length:], True


def _response_ids(response: str, tokenizer: Any, max_response_length: int) -> tuple[list[int], bool]:
    """Token ids of ``response`` + EOS (no other special tokens), right-truncated."""
    if max_response_length < 1:
        raise ValueError(f"max_response_length must be >= 1, got {max_response_length}")
    ids = list(tokenizer(response, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    return ids[:max_response_length], len(ids) > max_response_length


def _sequence(prompt_ids: list[int], response_ids: list[int]) -> dict[str, list[int]]:
    return {
        "input_ids": prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
    }


def tokenize_sft(
    example: SFTExample, tokenizer: Any, max_prompt_length: int, max_response_length: int
) -> dict[str, Any]:
    """Tokenise an SFT example into one sequence whose labels cover only the response.

    Returns:
        ``input_ids``: prompt ids (with the tokenizer's special tokens, left-truncated to
        ``max_prompt_length``) + response ids + EOS (right-truncated, EOS included, to
        ``max_response_length``); ``labels``: ``-100`` on the prompt, then the response
        ids; ``prompt_truncated`` / ``response_truncated``: whether either was cut.
    """
    prompt, p_cut = _prompt_ids(example.prompt, tokenizer, max_prompt_length)
    response, r_cut = _response_ids(example.response, tokenizer, max_response_length)
    return {**_sequence(prompt, response), "prompt_truncated": p_cut, "response_truncated": r_cut}


def tokenize_preference(
    example: PreferenceExample, tokenizer: Any, max_prompt_length: int, max_response_length: int
) -> dict[str, Any]:
    """Tokenise a preference pair: chosen and rejected each as in :func:`tokenize_sft`.

    Returns:
        ``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``,
        ``rejected_labels`` (lists of ints), ``margin`` and ``probability`` (float or None),
        ``prompt_truncated`` and ``response_truncated`` (True if either response was cut).
    """
    prompt, p_cut = _prompt_ids(example.prompt, tokenizer, max_prompt_length)
    chosen, c_cut = _response_ids(example.chosen, tokenizer, max_response_length)
    rejected, r_cut = _response_ids(example.rejected, tokenizer, max_response_length)
    out: dict[str, Any] = {}
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        out.update({f"{name}_{k}": v for k, v in _sequence(prompt, response).items()})
    out |= {"margin": example.margin, "probability": example.probability}
    return {**out, "prompt_truncated": p_cut, "response_truncated": c_cut or r_cut}


def tokenize_prompt(example: PromptExample, tokenizer: Any, max_prompt_length: int) -> dict[str, Any]:
    """Tokenise a prompt for generation.

    Returns:
        ``input_ids`` (left-truncated to ``max_prompt_length``), ``prompt`` (the raw,
        untruncated text) and ``prompt_truncated``.
    """
    ids, cut = _prompt_ids(example.prompt, tokenizer, max_prompt_length)
    return {"input_ids": ids, "prompt": example.prompt, "prompt_truncated": cut}


def pad_right(sequences: list[list[int]], value: int) -> torch.Tensor:
    """Stack ``sequences`` into a ``(N, max_len)`` long tensor, padding on the right."""
    out = torch.full((len(sequences), max(map(len, sequences))), value, dtype=torch.long)  # (N, T)
    for i, seq in enumerate(sequences):
        out[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


def pad_left(sequences: list[list[int]], value: int) -> torch.Tensor:
    """Stack ``sequences`` into a ``(N, max_len)`` long tensor, padding on the left."""
    width = max(map(len, sequences))
    out = torch.full((len(sequences), width), value, dtype=torch.long)  # (N, Q)
    for i, seq in enumerate(sequences):
        out[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
    return out


def _mask_right(sequences: list[list[int]]) -> torch.Tensor:
    return pad_right([[1] * len(s) for s in sequences], 0)  # (N, T)


class SFTCollator:
    """Right-pad tokenised SFT examples to the longest in the batch.

    Returns ``{"input_ids": (B, T), "attention_mask": (B, T), "labels": (B, T)}`` (long
    tensors; ``labels`` is ``-100`` on prompt and padding), plus the scalar
    ``loss_denominator`` when the features carry one.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [f["input_ids"] for f in features]
        batch = {
            "input_ids": pad_right(ids, self.pad_token_id),  # (B, T)
            "attention_mask": _mask_right(ids),  # (B, T)
            "labels": pad_right([f["labels"] for f in features], IGNORE_INDEX),  # (B, T)
        }
        if "loss_denominator" in features[0]:  # training batches (datamodules.TokenWindowSampler)
            denominators = {f["loss_denominator"] for f in features}
            if len(denominators) != 1:
                raise ValueError(f"a micro-batch spans accumulation windows (denominators {sorted(denominators)})")
            batch["loss_denominator"] = torch.tensor(denominators.pop(), dtype=torch.float32)  # ()
        return batch


class PreferenceCollator:
    """Pack B tokenised pairs into one right-padded batch of 2B sequences.

    Rows ``0..B-1`` are the chosen sequences, rows ``B..2B-1`` the rejected ones in the
    same order, all padded to the longest of the 2B, so one forward pass scores both.
    Returns ``input_ids``, ``attention_mask``, ``labels`` (each ``(2B, T)``),
    ``num_pairs`` (int B), ``index`` ``(B,)`` long when every feature has an ``index``
    (its position in the dataset) and, when any pair has a margin, ``margin`` ``(B,)``
    float (0.0 for pairs without one) and, when any pair has a soft label, ``probability``
    ``(B,)`` float (1.0 for pairs without one: chosen is better).
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
        labels = [f["chosen_labels"] for f in features] + [f["rejected_labels"] for f in features]
        batch: dict[str, Any] = {
            "input_ids": pad_right(ids, self.pad_token_id),  # (2B, T)
            "attention_mask": _mask_right(ids),  # (2B, T)
            "labels": pad_right(labels, IGNORE_INDEX),  # (2B, T)
            "num_pairs": len(features),
        }
        if all("index" in f for f in features):
            batch["index"] = torch.tensor([f["index"] for f in features], dtype=torch.long)  # (B,)
        margins = [f.get("margin") for f in features]
        if any(m is not None for m in margins):
            batch["margin"] = torch.tensor([0.0 if m is None else m for m in margins])  # (B,)
        probs = [f.get("probability") for f in features]
        if any(p is not None for p in probs):
            batch["probability"] = torch.tensor([1.0 if p is None else p for p in probs])  # (B,)
        return batch


class PromptCollator:
    """Left-pad tokenised prompts for generation.

    Returns ``{"input_ids": (B, Q), "attention_mask": (B, Q), "prompts": list[str]}``:
    every prompt ends at column ``Q - 1`` so generated tokens line up.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [f["input_ids"] for f in features]
        return {
            "input_ids": pad_left(ids, self.pad_token_id),  # (B, Q)
            "attention_mask": pad_left([[1] * len(s) for s in ids], 0),  # (B, Q)
            "prompts": [f["prompt"] for f in features],
        }
