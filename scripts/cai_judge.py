"""How well a feedback model applies the demo constitution: per principle, how its critique
score separates grammar reviews the principle's rule flags from those it does not, and how the
score over every principle agrees with the gold reward (the numbers in docs/cai.md).

    python scripts/cai_judge.py runs/cai/sft/hf [--constitution configs/constitution_demo.yaml] [--n 600]

Reviews come from the demo grammar (``data/demo_cai.sample_review``, a fault in 30 % of them);
each principle's rule (``data/demo_cai.RULES``) says which ones it flags. The score is the
feedback's ``log q`` (``cai/feedback.no_problem_logprobs``: the critique that finds no problem).
Printed: per principle the share of clean reviews, the AUC (a clean review scoring above a
flagged one), the accuracy of ``q > 1/2`` and the mean ``q`` of clean and flagged reviews; then
the AUC of the score summed over the principles for reviews clean under all of them, and its
agreement with the gold reward on pairs of reviews whose gold rewards differ.
"""

from __future__ import annotations

import argparse
import itertools
import random

import torch

from rlhf_lightning.cai.constitution import load_constitution
from rlhf_lightning.cai.feedback import no_problem_logprobs
from rlhf_lightning.data.demo import gold_reward
from rlhf_lightning.data.demo_cai import RULES, offending, review_text, sample_review
from rlhf_lightning.eval.sampling import load_frozen_lm
from rlhf_lightning.models import load_tokenizer

REQUEST = "Review of the film I watched last night."


def auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(a positive scores above a negative), ties counted half."""
    if not len(pos) or not len(neg):
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("feedback_model")
    p.add_argument("--constitution", default="configs/constitution_demo.yaml")
    p.add_argument("--n", type=int, default=600, help="grammar reviews")
    p.add_argument("--seed", type=int, default=123)
    args = p.parse_args()
    const = load_constitution(args.constitution)
    tok = load_tokenizer(args.feedback_model)
    model = load_frozen_lm(args.feedback_model, tok)
    rng = random.Random(args.seed)
    reviews = [sample_review(rng, defect_rate=0.3) for _ in range(args.n)]
    texts = [review_text(r) for r in reviews]
    gold = torch.tensor([gold_reward(REQUEST, t) for t in texts])
    total = torch.zeros(len(texts))
    clean_all = torch.ones(len(texts), dtype=torch.bool)
    print(f"{'principle':<12} clean   AUC   acc(q>1/2)  mean q clean / flagged")
    for principle in const.principles:
        log_q = no_problem_logprobs(model, tok, [REQUEST] * len(texts), texts, [principle] * len(texts), const, 64, 200)
        clean = torch.tensor([not offending(r, RULES[principle.name]) for r in reviews])
        q = log_q.exp()
        acc = float(((q > 0.5) == clean).float().mean())
        print(
            f"{principle.name:<12} {clean.float().mean():.2f}  {auc(log_q[clean], log_q[~clean]):.3f}  {acc:.3f}"
            f"       {q[clean].mean():.2f} / {q[~clean].mean():.2f}"
        )
        total += log_q
        clean_all &= clean
    pairs = [(i, j) for i, j in itertools.combinations(range(len(texts)), 2) if gold[i] != gold[j]]
    agree = sum(bool((total[i] > total[j]) == (gold[i] > gold[j])) for i, j in pairs) / max(len(pairs), 1)
    print(f"all principles: AUC {auc(total[clean_all], total[~clean_all]):.3f} for the {int(clean_all.sum())} reviews")
    print(f"clean under every principle; agreement with the gold reward {agree:.3f} over {len(pairs)} pairs")


if __name__ == "__main__":
    main()
