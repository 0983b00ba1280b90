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

A pair may be judged under several principles at once (``feedback.principles: all``): in choice
mode ``p_xy`` and ``p_yx`` are then the means over the principles' questions (an ensemble of
judges); in critique mode a response is acceptable when no principle's critique finds a problem,
``Q = prod_k q_k`` (the critiques taken as independent), and ``P(x better) = sigmoid(logit Q_x -
logit Q_y)``.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from rlhf_lightning.cai.constitution import Constitution, Principle
from rlhf_lightning.cai.prompts import (
    critique_prompt,
    feedback_prompt,
    no_problem_critique,
    option_continuations,
    split_sentences,
)
from rlhf_lightning.data.collate import PromptCollator, pad_right, tokenize_prompt
from rlhf_lightning.data.records import PromptExample
from rlhf_lightning.models import response_logprobs

log = logging.getLogger(__name__)


@torch.no_grad()
def continuation_logprobs(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[str],
    continuations: list[tuple[list[int], list[int]]],
    batch_size: int = 64,
    max_prompt_length: int = 1024,
) -> torch.Tensor:
    """``(N,)``: ``sum_t m_t log P(token_t | prompt_n, tokens before t)`` of each row's continuation
    ``(token ids, 0/1 scored mask m)``: the prompt left-padded as for generation, the continuation
    right-padded after it, scored by :func:`~rlhf_lightning.models.response_logprobs`."""
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    feats = [tokenize_prompt(PromptExample(p), tokenizer, max_prompt_length) for p in prompts]
    collate = PromptCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    out = torch.zeros(len(prompts))  # (N,)
    model.eval()
    for start in range(0, len(prompts), batch_size):
        rows = range(start, min(start + batch_size, len(prompts)))
        q = collate([feats[n] for n in rows])
        a_ids = pad_right([continuations[n][0] for n in rows], tokenizer.pad_token_id)  # (B, A)
        scored = pad_right([continuations[n][1] for n in rows], 0).float()  # (B, A)
        ids = torch.cat([q["input_ids"], a_ids], 1).to(device)  # (B, Q+A)
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if limit and ids.shape[1] > limit:
            raise ValueError(
                f"a prompt ({q['input_ids'].shape[1]} tokens) and its scored continuation ({a_ids.shape[1]}) exceed "
                f"the model's {limit} positions: lower max_prompt_length or sample shorter responses"
            )
        mask = torch.cat([q["attention_mask"], pad_right([[1] * len(continuations[n][0]) for n in rows], 0)], 1)
        logp = response_logprobs(model, ids, mask.to(device), q["input_ids"].shape[1]).logprobs  # (B, A)
        out[start : start + len(rows)] = (logp.float().cpu() * scored).sum(-1)
    return out


def scored_tokens(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """``text``'s token ids and a mask: 1 for a token overlapping one of the character
    ``spans``, else 0 (every token when the spans cover the text; otherwise the tokenizer must give
    offsets, as every fast tokenizer does)."""
    if not text:
        raise ValueError("a continuation to score is empty")
    if spans == [(0, len(text))]:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError(f"the continuation {text!r} tokenises to nothing")
        return ids, [1] * len(ids)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    scored = [int(any(s < b and e > a for a, b in spans)) for s, e in offsets]
    if not any(scored):
        raise ValueError(f"no token of {text!r} falls in the scored spans {spans}")
    return ids, scored


def option_logprobs(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[str],
    continuations: list[str],
    batch_size: int = 64,
    max_prompt_length: int = 1024,
) -> torch.Tensor:
    """``(N, K)``: ``log P(continuation_k | prompt_n)``, summed over the continuation's tokens."""
    conts = [scored_tokens(tokenizer, c, [(0, len(c))]) for c in continuations]
    rows = [(n, k) for n in range(len(prompts)) for k in range(len(conts))]
    lp = continuation_logprobs(
        model, tokenizer, [prompts[n] for n, _ in rows], [conts[k] for _, k in rows], batch_size, max_prompt_length
    )
    return lp.view(len(prompts), len(conts))


def option_probabilities(model, tokenizer, prompts, continuations, batch_size=64, max_prompt_length=1024):
    """``(N, K)`` option probabilities normalised over the K options (a softmax of the log-probs)."""
    return option_logprobs(model, tokenizer, prompts, continuations, batch_size, max_prompt_length).softmax(-1)


@dataclass(frozen=True)
class PairLabel:
    """The feedback on one pair (x, y): ``p_xy`` asked with x first, ``p_yx`` with y first (both the
    probability that x is better), their mean ``probability`` and the principle asked under
    (names joined by ``+`` when several)."""

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
    principles: list[Principle | tuple[Principle, ...]],
    constitution: Constitution,
    batch_size: int = 64,
    max_prompt_length: int = 1024,
) -> list[PairLabel]:
    """Ask the feedback model about every pair in both orders (module docstring).

    Args:
        requests: the user's request of each pair (quoted as ``{prompt}`` in the question).
        pairs: ``(x, y)`` responses.
        principles: the principle each pair is judged under (it must have a ``choice``), or a
            tuple of principles to judge it under all at once.
    """
    if not len(requests) == len(pairs) == len(principles):
        raise ValueError(f"{len(requests)} requests, {len(pairs)} pairs, {len(principles)} principles")
    groups = [tuple(pr) if isinstance(pr, (tuple, list)) else (pr,) for pr in principles]
    if constitution.feedback.mode == "critique":
        return label_pairs_by_critique(
            model, tokenizer, requests, pairs, groups, constitution, batch_size, max_prompt_length
        )
    question = replace(constitution.feedback, options=constitution.feedback.options[:2])
    const = replace(constitution, feedback=question)
    texts = []
    for req, (x, y), group in zip(requests, pairs, groups, strict=True):
        for pr in group:
            texts += [
                feedback_prompt(req, [x, y], pr, const, tokenizer),
                feedback_prompt(req, [y, x], pr, const, tokenizer),
            ]
    probs = option_probabilities(model, tokenizer, texts, option_continuations(question), batch_size, max_prompt_length)
    labels, row = [], 0
    for group in groups:
        k = len(group)
        p_xy = probs[row : row + 2 * k : 2, 0].mean()  # x first: P(first label)
        p_yx = probs[row + 1 : row + 2 * k : 2, 1].mean()  # y first: P(second label)
        labels.append(PairLabel(float(p_xy), float(p_yx), "+".join(pr.name for pr in group)))
        row += 2 * k
    return labels


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
    critique text is preceded by a space unless the prompt ends with whitespace). With a per-sentence
    ``no_problems`` (``"{sentence} (ok)"``, :func:`~rlhf_lightning.cai.prompts.no_problem_critique`)
    it is per sentence: the mean over the sentences of ``log P(ok verdict)``, the copied sentences
    given, so that a review is not judged worse for having more sentences to judge."""
    template = constitution.feedback.no_problems
    if not template:
        raise ValueError("critique feedback needs the constitution's feedback.no_problems")
    prompts = [
        critique_prompt([{"role": "user", "content": q}], r, p, constitution, tokenizer)
        for q, r, p in zip(requests, responses, principles, strict=True)
    ]
    conts = []
    for prompt, response in zip(prompts, responses, strict=True):
        text, spans = no_problem_critique(response, template)
        if prompt and not prompt[-1].isspace():  # the critique starts with a space
            text, spans = " " + text, [(a + 1, b + 1) for a, b in spans]
            spans = [(0, b) if a == 1 else (a, b) for a, b in spans]  # the space goes with a leading verdict
        conts.append(scored_tokens(tokenizer, text, spans))
    logp = continuation_logprobs(model, tokenizer, prompts, conts, batch_size, max_prompt_length)
    if "{sentence}" not in template:
        return logp
    sentences = torch.tensor([max(len(split_sentences(r)), 1) for r in responses], dtype=logp.dtype)
    return logp / sentences  # per sentence: a longer review has more verdicts, not worse ones


def label_pairs_by_critique(
    model: nn.Module,
    tokenizer: Any,
    requests: list[str],
    pairs: list[tuple[str, str]],
    principles: list[tuple[Principle, ...]],
    constitution: Constitution,
    batch_size: int = 64,
    max_prompt_length: int = 1024,
) -> list[PairLabel]:
    """Feedback from the model's own critiques: each response alone gets ``Q``, the probability that
    its critique is ``no problems`` under each of the pair's principles (``q``, or the product of the
    ``q_k``), and ``P(x better) = sigmoid(logit Q_x - logit Q_y)`` (the Bradley–Terry probability of
    two independent "acceptable" judgements). One response per question, so there is no position to
    be biased by: ``p_xy = p_yx``."""
    rows = [(n, side, pr) for n, group in enumerate(principles) for side in (0, 1) for pr in group]
    lp = no_problem_logprobs(
        model,
        tokenizer,
        [requests[n] for n, _, _ in rows],
        [pairs[n][side] for n, side, _ in rows],
        [pr for _, _, pr in rows],
        constitution,
        batch_size,
        max_prompt_length,
    )
    log_q = torch.zeros(len(pairs), 2).index_put_(
        (torch.tensor([n for n, _, _ in rows]), torch.tensor([side for _, side, _ in rows])), lp, accumulate=True
    )  # (N, 2): log Q of x and of y
    logit = log_q - torch.log1p(-log_q.exp().clamp(max=1 - 1e-6))  # log Q - log(1 - Q)
    probs = torch.sigmoid(logit[:, 0] - logit[:, 1])  # (N,)
    return [
        PairLabel(float(p), float(p), "+".join(pr.name for pr in group))
        for p, group in zip(probs.tolist(), principles, strict=True)
    ]


def draw_choice_principles(constitution: Constitution, n: int, seed: int) -> list[tuple[Principle, ...]]:
    """What each of ``n`` pairs is judged under: one principle drawn uniformly among those AI feedback
    may ask under (``choice_principles``), or all of them with ``feedback.principles: all``."""
    options = constitution.choice_principles
    if not options:
        raise ValueError(f"constitution {constitution.name!r}: no principle has a 'choice' (AI-feedback) question")
    if constitution.feedback.principles == "all":
        return [options] * n
    rng = random.Random(seed)
    return [(options[rng.randrange(len(options))],) for _ in range(n)]
