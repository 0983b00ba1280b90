"""``rlhf-lightning cai-label``: sample responses from a policy, label pairs by AI feedback, write them.

Per prompt the policy samples ``samples_per_prompt`` responses (one batched generation); every
two distinct ones form a pair, judged by the feedback model under a principle drawn at random
(:mod:`rlhf_lightning.cai.feedback`). Written under ``out_dir``:

* ``preferences_train.jsonl`` / ``preferences_val.jsonl``: ``{prompt, chosen, rejected,
  probability}`` (split by prompt), ``probability`` the soft label that the reward stage reads;
* ``samples.jsonl``: every non-empty sampled response as ``{prompt, response}`` (the reward
  stage normalises its scores on these);
* ``labels.jsonl``: per pair both orders' answers, the principle, the label;
* ``stats.json``: counts, how often the two orders disagree and, when a gold reward is named,
  how often the labels agree with it. The gold reward is *measured against*, never used to label.

Pairs of identical responses, or with an empty one, are counted and left out.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhf_lightning.cai.constitution import load_constitution
from rlhf_lightning.cai.feedback import draw_choice_principles, label_pairs
from rlhf_lightning.cai.generate import complete, read_prompt_records, write_jsonl
from rlhf_lightning.cai.prompts import prompt_messages, request_text
from rlhf_lightning.generation import SamplingConfig

log = logging.getLogger(__name__)


@dataclass
class LabelSettings:
    """Settings of ``rlhf-lightning cai-label`` and of the ``cai_label`` pipeline stage."""

    samples_per_prompt: int = 2
    max_prompts: int | None = None
    val_fraction: float = 0.1
    batch_size: int = 64
    max_prompt_length: int = 1024
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=64))
    seed: int = 0


def gold_agreement(labels: list[float], gold_x: list[float], gold_y: list[float]) -> dict[str, Any]:
    """How often ``P(x better) > 1/2`` agrees with ``gold(x) > gold(y)``, over pairs whose gold rewards
    differ and whose label is not exactly 1/2; also the mean soft agreement ``P`` or ``1 - P``."""
    hard, soft = [], []
    for p, gx, gy in zip(labels, gold_x, gold_y, strict=True):
        if gx == gy:
            continue
        soft.append(p if gx > gy else 1 - p)
        if p != 0.5:
            hard.append((p > 0.5) == (gx > gy))
    return {
        "gold_agreement": round(sum(hard) / len(hard), 4) if hard else None,
        "gold_soft_agreement": round(sum(soft) / len(soft), 4) if soft else None,
        "gold_pairs_compared": len(hard),
        "gold_ties": len(labels) - len(soft),
    }


def run_label(
    policy: str,
    feedback_model: str,
    prompts_file: str,
    constitution: str,
    out_dir: str,
    settings: LabelSettings | None = None,
    gold_reward: str | None = None,
) -> dict[str, Any]:
    """Sample, label and write (module docstring); returns the statistics written to ``stats.json``."""
    from rlhf_lightning.eval.sampling import check_same_vocab, load_frozen_lm
    from rlhf_lightning.models import load_tokenizer

    s = settings or LabelSettings()
    if s.samples_per_prompt < 2:
        raise ValueError(f"samples_per_prompt must be >= 2 to form pairs, got {s.samples_per_prompt}")
    start = time.perf_counter()
    const = load_constitution(constitution)
    tok = load_tokenizer(policy)
    records = read_prompt_records(prompts_file, tok, s.max_prompts)
    torch.manual_seed(s.seed)
    model = load_frozen_lm(policy, tok)
    texts = [r["text"] for r in records for _ in range(s.samples_per_prompt)]
    samples = complete(model, tok, texts, s.sampling, s.batch_size, s.max_prompt_length)
    if feedback_model != policy:
        del model
        check_same_vocab(tok, feedback_model, "the feedback model")
        model = load_frozen_lm(feedback_model, tok)
    counts = {"prompts": len(records), "samples": len(samples), "no_eos": sum(not c.ended for c in samples)}
    counts["identical_pairs"] = counts["empty_pairs"] = 0
    pairs, owners = [], []
    for n in range(len(records)):
        group = samples[n * s.samples_per_prompt : (n + 1) * s.samples_per_prompt]
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                if group[i].text.strip() == group[j].text.strip():
                    counts["identical_pairs"] += 1
                    continue
                if not group[i].text.strip() or not group[j].text.strip():
                    counts["empty_pairs"] += 1
                    continue
                pairs.append((group[i].text, group[j].text))
                owners.append(n)
    if not pairs:
        raise RuntimeError(f"no pair of distinct responses among {len(samples)} samples: {counts}")
    principles = draw_choice_principles(const, len(pairs), s.seed)
    requests = [request_text(prompt_messages(records[n])) for n in owners]
    labels = label_pairs(model, tok, requests, pairs, principles, const, s.batch_size, s.max_prompt_length)
    val_prompts = set(random.Random(s.seed).sample(range(len(records)), round(s.val_fraction * len(records))))
    split: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    rows = []
    for n, (x, y), lab in zip(owners, pairs, labels, strict=True):
        p = lab.probability
        chosen, rejected = (x, y) if p >= 0.5 else (y, x)
        prompt = records[n]["text"]
        split["val" if n in val_prompts else "train"].append(
            {"prompt": prompt, "chosen": chosen, "rejected": rejected, "probability": round(max(p, 1 - p), 6)}
        )
        rows.append({"prompt": prompt, "x": x, "y": y, **asdict(lab), "probability": p})
    counts["pairs"] = len(pairs)
    stats: dict[str, Any] = {
        "counts": counts,
        "orders_disagree": round(sum(lab.orders_disagree for lab in labels) / len(labels), 4),
        "mean_confidence": round(sum(abs(lab.probability - 0.5) for lab in labels) / len(labels) + 0.5, 4),
        "first_option_rate": round(sum((lab.p_xy + 1 - lab.p_yx) / 2 for lab in labels) / len(labels), 4),
    }
    if gold_reward:
        from rlhf_lightning.importing import import_callable

        gold = import_callable(gold_reward)
        gx = [gold(records[n]["text"], x) for n, (x, _) in zip(owners, pairs, strict=True)]
        gy = [gold(records[n]["text"], y) for n, (_, y) in zip(owners, pairs, strict=True)]
        stats |= gold_agreement([lab.probability for lab in labels], gx, gy)
        by_principle: dict[str, list[tuple[float, float, float]]] = {}
        for lab, a, b in zip(labels, gx, gy, strict=True):
            by_principle.setdefault(lab.principle, []).append((lab.probability, a, b))
        stats["gold_agreement_by_principle"] = {
            name: gold_agreement(*map(list, zip(*rows, strict=True)))["gold_agreement"]
            for name, rows in sorted(by_principle.items())
        }
        for row, a, b in zip(rows, gx, gy, strict=True):
            row["gold_x"], row["gold_y"] = a, b
    root = Path(out_dir)
    write_jsonl(root / "preferences_train.jsonl", split["train"])
    write_jsonl(root / "preferences_val.jsonl", split["val"])
    kept = [{"prompt": t, "response": c.text} for t, c in zip(texts, samples, strict=True) if c.text.strip()]
    write_jsonl(root / "samples.jsonl", kept)  # the SFT format: an empty response is not a record
    write_jsonl(root / "labels.jsonl", rows)
    stats |= {
        "policy": policy,
        "feedback_model": feedback_model,
        "constitution": constitution,
        "settings": asdict(s),
        "seconds": round(time.perf_counter() - start, 1),
    }
    (root / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log.info("AI feedback: %s", {k: v for k, v in stats.items() if k not in ("settings",)})
    return stats
