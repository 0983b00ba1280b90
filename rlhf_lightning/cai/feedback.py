"""AI feedback (RLAIF): soft preference labels from a feedback model's multiple-choice answers.

For two responses ``x`` and ``y`` to a prompt and a principle drawn at random among those with
an AI-feedback question (Bai et al. 2022, section 4.1), the feedback model reads the question
(:func:`~rlhf_lightning.cai.prompts.feedback_prompt`) with the options in both orders::

    p_xy = P(label_1) / (P(label_1) + P(label_2))   with (label_1) = x, (label_2) = y
    p_yx = P(label_2) / (P(label_1) + P(label_2))   with (label_1) = y, (label_2) = x
    P(x better) = (p_xy + p_yx) / 2

where ``P(label)`` is the probability of the label's tokens after the prompt (the product over
its tokens, so labels of several tokens are scored whole). Averaging the two orders cancels a
constant position bias; the orders *disagree* when ``p_xy`` and ``p_yx`` fall on different sides
of 1/2. The better response becomes ``chosen`` and ``probability = max(P, 1 - P)`` its soft label.

``feedback.mode: critique`` is the alternative for a feedback model that cannot answer the
question but can critique: :func:`label_pairs_by_critique`.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from rlhf_lightning.cai.constitution import Constitution, Principle
from rlhf_lightning.cai.prompts import critique_prompt, feedback_prompt, option_continuations
from rlhf_lightning.data.collate import PromptCollator, pad_right, tokenize_prompt
from rlhf_lightning.data.records import PromptExample
from rlhf_lightning.models import response_logprobs

log = logging.getLogger(__name__)


@torch.no_grad()
def option_logprobs(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[str],
    continuations: list[str],
    batch_size: int = 64,
    max_prompt_length: int = 1024,
) -> torch.Tensor:
    """``(N, K)``: ``log P(continuation_k | prompt_n)``, summed over the continuation's tokens.

    Each (prompt, continuation) is one row: the prompt left-padded as for generation, the
    continuation right-padded after it, scored by :func:`~rlhf_lightning.models.response_logprobs`.
    """
    conts = [list(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in continuations]
    if any(not c for c in conts):
        raise ValueError(f"an option continuation tokenises to nothing: {continuations}")
    feats = [tokenize_prompt(PromptExample(p), tokenizer, max_prompt_length) for p in prompts]
    rows = [(n, k) for n in range(len(prompts)) for k in range(len(conts))]
    collate = PromptCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    out = torch.zeros(len(prompts), len(conts))  # (N, K)
    model.eval()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        q = collate([feats[n] for n, _ in chunk])
        a_ids = pad_right([conts[k] for _, k in chunk], tokenizer.pad_token_id)  # (B, A)
        a_mask = pad_right([[1] * len(conts[k]) for _, k in chunk], 0)  # (B, A)
        ids = torch.cat([q["input_ids"], a_ids], 1).to(device)  # (B, Q+A)
        mask = torch.cat([q["attention_mask"], a_mask], 1).to(device)  # (B, Q+A)
        logp = response_logprobs(model, ids, mask, q["input_ids"].shape[1]).logprobs  # (B, A)
        sums = (logp.float().cpu() * a_mask).sum(-1)  # (B,)
        for (n, k), s in zip(chunk, sums.tolist(), strict=True):
            out[n, k] = s
    return out


def option_probabilities(model, tokenizer, prompts, continuations, batch_size=64, max_prompt_length=1024):
    """``(N, K)`` option probabilities normalised over the K options (a softmax of the log-probs)."""
    return option_logprobs(model, tokenizer, prompts, continuations, batch_size, max_prompt_length).softmax(-1)


@dataclass(frozen=True)
class PairLabel:
    """The feedback on one pair (x, y): ``p_xy`` asked with x first, ``p_yx`` with y first (both the
    probability that x is better), their mean ``probability`` and the principle asked under."""

    p_xy: float
    p_yx: float
    principle: str

    @property
    def probability(self) -> float:
        return (self.p_xy + self.p_yx) / 2

    @property
    def orders_disagree(self) -> bool:
        return (self.p_xy - 0.5) * (self.p_yx - 0.5) < 0


def label_pairs(
    model: nn.Module,
    tokenizer: Any,
    requests: list[str],
    pairs: list[tuple[str, str]],
    principles: list[Principle],
    constitution: Constitution,
    batch_size: int = 64,
    max_prompt_length: int = 1024,
) -> list[PairLabel]:
    """Ask the feedback model about every pair in both orders (module docstring).

    Args:
        requests: the user's request of each pair (quoted as ``{prompt}`` in the question).
        pairs: ``(x, y)`` responses.
        principles: the principle each pair is judged under (it must have a ``choice``).
    """
    if not len(requests) == len(pairs) == len(principles):
        raise ValueError(f"{len(requests)} requests, {len(pairs)} pairs, {len(principles)} principles")
    if constitution.feedback.mode == "critique":
        return label_pairs_by_critique(
            model, tokenizer, requests, pairs, principles, constitution, batch_size, max_prompt_length
        )
    question = replace(constitution.feedback, options=constitution.feedback.options[:2])
    const = replace(constitution, feedback=question)
    texts = []
    for req, (x, y), pr in zip(requests, pairs, principles, strict=True):
        texts += [
            feedback_prompt(req, [x, y], pr, const, tokenizer),
            feedback_prompt(req, [y, x], pr, const, tokenizer),
        ]
    probs = option_probabilities(model, tokenizer, texts, option_continuations(question), batch_size, max_prompt_length)
    return [PairLabel(float(probs[2 * i, 0]), float(probs[2 * i + 1, 1]), pr.name) for i, pr in enumerate(principles)]


def no_problem_logprobs(
    model: nn.Module,
    tokenizer: Any,
    requests: list[str],
    responses: list[str],
    principles: list[Principle],
    constitution: Constitution,
    batch_size: int = 64,
    max_prompt_length: int = 1024,
) -> torch.Tensor:
    """``(N,)``: ``log P(no_problems | critique prompt)`` of each response under its principle (the
    critique text is preceded by a space unless the prompt ends with whitespace)."""
    text = constitution.feedback.no_problems
    if not text:
        raise ValueError("critique feedback needs the constitution's feedback.no_problems")
    prompts = [
        critique_prompt([{"role": "user", "content": q}], r, p, constitution, tokenizer)
        for q, r, p in zip(requests, responses, principles, strict=True)
    ]
    out = torch.zeros(len(prompts))  # (N,)
    for spaced in (False, True):  # one continuation per prompt ending
        rows = [i for i, t in enumerate(prompts) if (not t or t[-1].isspace()) != spaced]
        if rows:
            cont = (" " if spaced else "") + text
            lp = option_logprobs(model, tokenizer, [prompts[i] for i in rows], [cont], batch_size, max_prompt_length)
            out[rows] = lp[:, 0]
    return out


def label_pairs_by_critique(
    model: nn.Module,
    tokenizer: Any,
    requests: list[str],
    pairs: list[tuple[str, str]],
    principles: list[Principle],
    constitution: Constitution,
    batch_size: int = 64,
    max_prompt_length: int = 1024,
) -> list[PairLabel]:
    """Feedback from the model's own critiques: each response alone gets ``q = P(no problems)`` under
    the pair's principle, and ``P(x better) = sigmoid(logit q_x - logit q_y)`` (the Bradley–Terry
    probability of two independent "acceptable" judgements). One response per question, so there is
    no position to be biased by: ``p_xy = p_yx``."""
    lp = no_problem_logprobs(
        model,
        tokenizer,
        requests + requests,
        [x for x, _ in pairs] + [y for _, y in pairs],
        principles + principles,
        constitution,
        batch_size,
        max_prompt_length,
    )
    logit = lp - torch.log1p(-lp.exp().clamp(max=1 - 1e-6))  # (2N,) log q - log(1 - q)
    n = len(pairs)
    probs = torch.sigmoid(logit[:n] - logit[n:])  # (N,)
    return [PairLabel(float(p), float(p), pr.name) for p, pr in zip(probs.tolist(), principles, strict=True)]


def draw_choice_principles(constitution: Constitution, n: int, seed: int) -> list[Principle]:
    """``n`` principles drawn uniformly among those AI feedback may ask under (``choice_principles``)."""
    options = constitution.choice_principles
    if not options:
        raise ValueError(f"constitution {constitution.name!r}: no principle has a 'choice' (AI-feedback) question")
    rng = random.Random(seed)
    return [options[rng.randrange(len(options))] for _ in range(n)]
