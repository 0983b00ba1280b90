"""Batched completion of many prompt texts with the project's sampler, and the shared file helpers.

Every CAI step generates through :func:`complete`: prompts are tokenised like the RL stages'
prompts (``tokenize_prompt``), sorted by length so a batch holds similar widths, left-padded
(``PromptCollator``) and sampled with :func:`~rlhf_lightning.generation.sample_responses`; the
answers come back in the caller's order.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf_lightning.data.collate import PromptCollator, tokenize_prompt
from rlhf_lightning.data.reading import read_records
from rlhf_lightning.data.records import PromptExample, parse_prompt
from rlhf_lightning.generation import SamplingConfig, decode_responses, sample_responses

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    """One sampled continuation: its text (EOS and padding removed), whether an EOS ended it
    within the budget, and whether its prompt had to be cut from the left to fit."""

    text: str
    ended: bool
    prompt_truncated: bool


def context_budget(model: nn.Module, max_prompt_length: int, max_new_tokens: int) -> int:
    """The longest prompt that leaves room for ``max_new_tokens`` in the model's context."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is None:
        return max_prompt_length
    if max_new_tokens >= limit:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in a {limit}-token context")
    return min(max_prompt_length, limit - max_new_tokens)


@torch.no_grad()
def complete(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[str],
    sampling: SamplingConfig,
    batch_size: int = 64,
    max_prompt_length: int = 1024,
) -> list[Completion]:
    """Sample one continuation of each text in ``prompts`` (batched, in the order given)."""
    width = context_budget(model, max_prompt_length, sampling.max_new_tokens)
    features = [tokenize_prompt(PromptExample(p), tokenizer, width) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(features[i]["input_ids"]))
    collate = PromptCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    out: list[Completion | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = collate([features[i] for i in rows])
        q_ids, q_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)  # (B, Q)
        gen = sample_responses(model, q_ids, q_mask, tokenizer.eos_token_id, tokenizer.pad_token_id, sampling)
        texts = decode_responses(tokenizer, gen)
        for i, text, ended in zip(rows, texts, gen.ended.tolist(), strict=True):
            out[i] = Completion(text, bool(ended), bool(features[i]["prompt_truncated"]))
    cut = sum(c.prompt_truncated for c in out)
    if cut:
        log.warning("%d of %d prompts were longer than %d tokens and were cut from the left", cut, len(out), width)
    return out  # type: ignore[return-value]


def read_prompt_records(file: str | os.PathLike, tokenizer: Any, limit: int | None = None) -> list[dict[str, Any]]:
    """The prompt records of ``file`` (validated like the RL stages' prompts), each with ``text``:
    what the policy is sampled on (a chat prompt rendered with the tokenizer's template)."""
    records = []
    for loc, record in read_records(file):
        if limit is not None and len(records) >= limit:
            break
        records.append({**record, "text": parse_prompt(record, loc, tokenizer).prompt})
    if not records:
        raise ValueError(f"{os.fspath(file)}: no prompts")
    return records


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return path
