"""Pure metrics of sampled responses, and the one list of metric columns every table shows.

Nothing here touches a model: the functions map per-sample records (built by
:mod:`rlhf_lightning.eval.sampling`) to numbers, so each can be checked by hand.
:data:`METRIC_COLUMNS` is the single description of the per-policy metrics that the
``rlhf-lightning evaluate`` table, the report's markdown table and the pipeline's
terminal summary all draw from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

QUANTILES = (10, 25, 50, 75, 90)


# ----------------------------------------------------------------------------- scalar metrics


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams over total n-grams, pooled over all ``texts`` (whitespace tokens).

    n-grams never cross from one text to the next. No n-gram at all gives 0.0.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    total, unique = 0, set()
    for text in texts:
        toks = text.split()
        grams = [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def win_rate(scores: list[float], baseline_scores: list[float]) -> float:
    """Mean over prompts of 1 (score above the baseline's), 0.5 (tie) or 0 (below)."""
    if len(scores) != len(baseline_scores):
        raise ValueError(f"{len(scores)} scores but {len(baseline_scores)} baseline scores")
    if not scores:
        raise ValueError("win_rate of no prompts")
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline_scores, strict=True)]
    return sum(wins) / len(wins)


def summarize(values: list[float]) -> dict[str, float]:
    """``mean``, ``std`` (population, ddof 0) and quantiles ``q10 q25 q50 q75 q90`` (linear interpolation)."""
    if not values:
        raise ValueError("summarize of no values")
    xs = sorted(float(v) for v in values)
    n = len(xs)
    mean = sum(xs) / n
    out = {"mean": mean, "std": math.sqrt(sum((x - mean) ** 2 for x in xs) / n)}
    for q in QUANTILES:
        pos = (n - 1) * q / 100
        lo, hi = math.floor(pos), math.ceil(pos)
        out[f"q{q}"] = xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
    return out


# ----------------------------------------------------------------------------- records -> metrics


def _measured(rows: list[dict[str, Any]], key: str) -> bool:
    return all(r.get(key) is not None for r in rows)


def aggregate_metrics(records: list[dict[str, Any]], baseline: str = "sft") -> dict[str, dict[str, Any]]:
    """Per-policy metrics from per-sample records (a pure function).

    Args:
        records: one dict per (policy, prompt) with ``policy``, ``index`` (the prompt's
            position, used to pair samples across policies), ``response``, ``length``
            (response tokens, EOS included), ``ended`` (bool) and, when measured,
            ``kl``, ``gold`` and ``proxy`` (None or absent otherwise).
        baseline: the policy the win rates compare against; when it is not among the
            records, no win rate is reported.

    Returns:
        ``{policy: metrics}`` in the order policies first appear.
    """
    by_policy: dict[str, list[dict]] = {}
    for r in records:
        by_policy.setdefault(r["policy"], []).append(r)
    base = {r["index"]: r for r in by_policy.get(baseline, [])}
    out: dict[str, dict[str, Any]] = {}
    for name, rows in by_policy.items():
        m: dict[str, Any] = {"n_samples": len(rows)}
        if _measured(rows, "gold"):
            s = summarize([r["gold"] for r in rows])
            m.update(
                gold_reward_mean=s["mean"],
                gold_reward_std=s["std"],
                gold_reward_quantiles={f"q{q}": s[f"q{q}"] for q in QUANTILES},
            )
        if _measured(rows, "proxy"):
            s = summarize([r["proxy"] for r in rows])
            m.update(proxy_reward_mean=s["mean"], proxy_reward_std=s["std"])
        if _measured(rows, "kl"):
            m["kl_to_ref"] = sum(r["kl"] for r in rows) / len(rows)
        m["eos_rate"] = sum(float(r["ended"]) for r in rows) / len(rows)
        m["response_length_mean"] = sum(r["length"] for r in rows) / len(rows)
        texts = [r["response"] for r in rows]
        m["distinct_1"], m["distinct_2"] = distinct_n(texts, 1), distinct_n(texts, 2)
        paired = [(r, base[r["index"]]) for r in rows if r["index"] in base]
        for key in ("gold", "proxy"):
            if paired and all(r.get(key) is not None and b.get(key) is not None for r, b in paired):
                m[f"win_rate_vs_{baseline}_{key}"] = win_rate([r[key] for r, _ in paired], [b[key] for _, b in paired])
        out[name] = m
    return out


def training_eval_metrics(records: list[dict[str, Any]], prefix: str = "eval") -> dict[str, float]:
    """The ``eval/*`` scalars logged during training, from the records of one evaluation.

    ``<prefix>/proxy_reward``, ``/kl``, ``/response_length``, ``/eos_rate`` and
    ``/gold_reward``, each the plain mean over samples (summed in record order); a quantity
    missing from any record (no reward model, no reference, no gold reward) is left out.
    """
    if not records:
        return {}
    n = len(records)
    out: dict[str, float] = {}
    if _measured(records, "proxy"):
        out[f"{prefix}/proxy_reward"] = sum(r["proxy"] for r in records) / n
    if _measured(records, "kl"):
        out[f"{prefix}/kl"] = sum(r["kl"] for r in records) / n
    out[f"{prefix}/response_length"] = sum(r["length"] for r in records) / n
    out[f"{prefix}/eos_rate"] = sum(float(r["ended"]) for r in records) / n
    if _measured(records, "gold"):
        out[f"{prefix}/gold_reward"] = sum(r["gold"] for r in records) / n
    return out


# ----------------------------------------------------------------------------- the metric columns


@dataclass(frozen=True)
class MetricColumn:
    """One per-policy metric as the tables show it. ``{b}`` in any field stands for the baseline.

    Attributes:
        key: the key in :func:`aggregate_metrics`' output.
        short: header in the terminal tables (``rlhf-lightning evaluate``, the pipeline summary).
        label: header in the report's markdown table.
        std: key of a standard deviation shown beside the value (``± sd`` in markdown,
            a ``<short>_sd`` column in the evaluate table).
        summary: whether the pipeline's end-of-run summary (a terminal line) shows it.
    """

    key: str
    short: str
    label: str
    std: str | None = None
    summary: bool = False

    def for_baseline(self, baseline: str) -> MetricColumn:
        """This column with ``{b}`` replaced by ``baseline``."""
        return replace(
            self,
            key=self.key.format(b=baseline),
            short=self.short.format(b=baseline),
            label=self.label.format(b=baseline),
        )


METRIC_COLUMNS: tuple[MetricColumn, ...] = (
    MetricColumn("gold_reward_mean", "gold", "gold reward", std="gold_reward_std", summary=True),
    MetricColumn("proxy_reward_mean", "proxy", "proxy reward", summary=True),
    MetricColumn("kl_to_ref", "KL", "KL to ref", summary=True),
    MetricColumn("eos_rate", "EOS", "EOS rate", summary=True),
    MetricColumn("response_length_mean", "length", "length", summary=True),
    MetricColumn("win_rate_vs_{b}_gold", "win/{b}", "win vs {b} (gold)", summary=True),
    MetricColumn("win_rate_vs_{b}_proxy", "win/{b}/proxy", "win vs {b} (proxy)"),
    MetricColumn("distinct_1", "d1", "distinct-1"),
    MetricColumn("distinct_2", "d2", "distinct-2"),
    MetricColumn("n_samples", "n", "n"),
)


def metric_columns(
    policies: dict[str, dict[str, Any]], baseline: str = "sft", summary: bool = False
) -> list[MetricColumn]:
    """The columns of :data:`METRIC_COLUMNS` that some policy has, for ``baseline``.

    ``summary=True`` keeps only the few columns of the terminal summary.
    """
    cols = [c.for_baseline(baseline) for c in METRIC_COLUMNS if c.summary or not summary]
    return [c for c in cols if any(c.key in m for m in policies.values())]
