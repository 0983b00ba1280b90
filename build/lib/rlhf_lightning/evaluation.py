"""Compare policies on held-out prompts: gold reward, proxy reward, KL to the reference, diversity.

``rlhf-lightning evaluate --policy sft=runs/demo/sft/hf --policy ppo=runs/demo/ppo/hf ...``
samples one response per held-out prompt from every policy with the same sampling
settings and the same seed, then reports per policy what the RLHF papers report:

* ``gold_reward_*``: the programmatic judge (any ``module:function(prompt, response)``);
* ``proxy_reward_mean``: the learned reward model (normalised scores);
* ``kl_to_ref``: Monte-Carlo ``KL(pi || pi_ref)``, the mean over samples of
  ``sum_t log pi(y_t) - log pi_ref(y_t)`` over response tokens (EOS included), both
  log-probs at the sampling temperature;
* win rates against a baseline policy's sample for the same prompt, EOS rate, length,
  and distinct-1/2.

The work is split in two so the numbers can be checked by hand: sampling and scoring
produce one record per (policy, prompt); :func:`aggregate_metrics` is a pure function
from those records to the metrics.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from rlhf_lightning.generation import SamplingConfig, decode_responses, sample_responses
from rlhf_lightning.logprobs import token_logprobs

log = logging.getLogger(__name__)

QUANTILES = (10, 25, 50, 75, 90)


# ----------------------------------------------------------------------------- pure metrics


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams over total n-grams, pooled over all ``texts`` (whitespace tokens).

    n-grams never cross from one text to the next. No n-gram at all gives 0.0.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    total, unique = 0, set()
    for text in texts:
        toks = text.split()
        grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def win_rate(scores: list[float], baseline_scores: list[float]) -> float:
    """Mean over prompts of 1 (score above the baseline's), 0.5 (tie) or 0 (below)."""
    if len(scores) != len(baseline_scores):
        raise ValueError(f"{len(scores)} scores but {len(baseline_scores)} baseline scores")
    if not scores:
        raise ValueError("win_rate of no prompts")
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline_scores)]
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


def aggregate_metrics(records: list[dict[str, Any]], baseline: str = "sft") -> dict[str, dict[str, Any]]:
    """Per-policy metrics from per-sample records (a pure function).

    Args:
        records: one dict per (policy, prompt) with ``policy``, ``index`` (the prompt's
            position, used to pair samples across policies), ``response``, ``length``
            (response tokens, EOS included), ``ended`` (bool), ``kl`` and, when measured,
            ``gold`` and ``proxy`` (None or absent otherwise).
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
        gold = [r.get("gold") for r in rows]
        if all(g is not None for g in gold):
            s = summarize(gold)
            m.update(gold_reward_mean=s["mean"], gold_reward_std=s["std"],
                     gold_reward_quantiles={f"q{q}": s[f"q{q}"] for q in QUANTILES})
        proxy = [r.get("proxy") for r in rows]
        if all(p is not None for p in proxy):
            s = summarize(proxy)
            m.update(proxy_reward_mean=s["mean"], proxy_reward_std=s["std"])
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


# ----------------------------------------------------------------------------- sampling and scoring


def _check_same_vocab(tokenizer, path: str, what: str) -> None:
    """The policy, reference and reward model must share token ids (KL and scoring use ids directly)."""
    from rlhf_lightning.models import load_tokenizer

    try:
        other = load_tokenizer(path)
    except (OSError, ValueError) as err:  # an export without tokenizer files: trust the caller
        log.warning("could not load a tokenizer from %s %s (%s); assuming it matches the reference", what, path, err)
        return
    if other.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"the tokenizer of {what} {path} differs from the reference's; "
                         "policies, reference and reward model must share one vocabulary")


@torch.no_grad()
def score_batch(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    reward_model: torch.nn.Module | None,
    tokenizer,
    batch: dict[str, Any],
    sampling: SamplingConfig,
) -> list[dict[str, Any]]:
    """Sample one response per (left-padded) prompt and measure it.

    Returns one record per row: ``prompt``, ``response``, ``length``, ``ended``, ``kl``
    (sequence log-ratio to the reference at the sampling temperature) and ``proxy`` (or None).
    """
    from rlhf_lightning.models import position_ids_from_mask

    q_ids, q_mask = batch["input_ids"], batch["attention_mask"]  # (B, Q)
    gen = sample_responses(policy, q_ids, q_mask, tokenizer.eos_token_id, tokenizer.pad_token_id, sampling)
    ids = torch.cat([q_ids, gen.response_ids], 1)  # (B, Q+A)
    mask = torch.cat([q_mask, gen.response_mask], 1)  # (B, Q+A)
    A = gen.response_ids.shape[1]

    def logps(model):
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                    use_cache=False, logits_to_keep=A + 1)
        return token_logprobs(out.logits[:, :-1], gen.response_ids, sampling.temperature)  # (B, A)

    ref_logp = logps(reference)
    logp = ref_logp if policy is reference else logps(policy)
    kl = ((logp - ref_logp) * gen.response_mask).sum(-1)  # (B,)
    proxy = reward_model(ids, mask).float().tolist() if reward_model is not None else [None] * len(kl)
    return [
        {"prompt": p, "response": r, "length": int(n), "ended": bool(e), "kl": float(k), "proxy": s}
        for p, r, n, e, k, s in zip(batch["prompts"], decode_responses(tokenizer, gen), gen.lengths.tolist(),
                                    gen.ended.tolist(), kl.tolist(), proxy)
    ]


def _same_path(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def evaluate_policies(
    policies: dict[str, str],
    prompts_file: str,
    reference: str,
    reward_model: str | None = None,
    gold_reward: str | None = "rlhf_lightning.data.demo:gold_reward",
    sampling: SamplingConfig | None = None,
    batch_size: int = 50,
    max_prompts: int | None = None,
    max_prompt_length: int = 64,
    seed: int = 0,
    baseline: str = "sft",
    out_dir: str | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Sample every policy on the same held-out prompts and compare them.

    Each policy is loaded in turn (one at a time besides the reference and the reward
    model, which are loaded once) and sampled with the same ``sampling`` settings after
    ``torch.manual_seed(seed)``. A policy whose path is the reference's reuses the
    reference model, so its ``kl_to_ref`` is exactly 0.

    Args:
        policies: ``{name: export path}`` (``save_pretrained`` directories or hub names).
        prompts_file: prompt records (``{"prompt"}`` or ``{"messages"}``).
        reference: the KL reference policy (usually the SFT export); its tokenizer is used.
        reward_model: a reward-model export for ``proxy_reward_*`` (None: skipped).
        gold_reward: ``module:function(prompt, response) -> float`` (None: skipped).
        baseline: the policy win rates compare against.
        out_dir: when given, write ``eval.json`` and ``eval_samples.jsonl`` there.
        device: default ``cuda`` when available, else ``cpu``.

    Returns:
        ``{"policies": {name: metrics}, "settings": {...}}`` (the content of ``eval.json``).
    """
    from rlhf_lightning.callbacks import load_callable
    from rlhf_lightning.data.collate import PromptCollator, tokenize_prompt
    from rlhf_lightning.data.records import load_examples
    from rlhf_lightning.models import disable_dropout, freeze, load_causal_lm, load_reward_model, load_tokenizer

    if not policies:
        raise ValueError("give at least one policy")
    sampling = sampling or SamplingConfig()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gold_fn: Callable[[str, str], float] | None = load_callable(gold_reward) if gold_reward else None
    if baseline not in policies:
        log.warning("baseline %r is not among the policies %s: no win rates", baseline, list(policies))

    tokenizer = load_tokenizer(reference, padding_side="left")
    examples = load_examples(prompts_file, "prompt", tokenizer=tokenizer)[:max_prompts]
    features = [tokenize_prompt(ex, tokenizer, max_prompt_length) for ex in examples]
    collate = PromptCollator(tokenizer.pad_token_id)
    batches = [collate(features[i:i + batch_size]) for i in range(0, len(features), batch_size)]

    def load_lm(path: str) -> torch.nn.Module:
        return freeze(disable_dropout(load_causal_lm(path, tokenizer))).to(device)

    ref_model = load_lm(reference)
    rm = None
    if reward_model:
        _check_same_vocab(tokenizer, reward_model, "reward model")
        rm = freeze(disable_dropout(load_reward_model(reward_model))).to(device)

    records: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    for name, path in policies.items():
        t0 = time.perf_counter()
        is_ref = _same_path(path, reference)
        if not is_ref:
            _check_same_vocab(tokenizer, path, f"policy {name!r}")
        model = ref_model if is_ref else load_lm(path)
        torch.manual_seed(seed)  # the same random stream for every policy
        index = 0
        for batch in batches:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            for row in score_batch(model, ref_model, rm, tokenizer, batch, sampling):
                row["gold"] = float(gold_fn(row["prompt"], row["response"])) if gold_fn else None
                records.append({"policy": name, "index": index, **row})
                index += 1
        if not is_ref:
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        seconds[name] = time.perf_counter() - t0
        log.info("evaluated %s (%s) on %d prompts in %.1fs", name, path, index, seconds[name])

    result = {
        "policies": aggregate_metrics(records, baseline),
        "settings": {
            "policies": dict(policies), "reference": reference, "reward_model": reward_model,
            "gold_reward": gold_reward, "prompts_file": prompts_file, "n_prompts": len(examples),
            "max_prompts": max_prompts, "max_prompt_length": max_prompt_length, "batch_size": batch_size,
            "seed": seed, "baseline": baseline, "sampling": asdict(sampling), "device": str(device),
            "seconds": seconds,
        },
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        with (out / "eval_samples.jsonl").open("w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        log.info("wrote %s and %s", out / "eval.json", out / "eval_samples.jsonl")
    return result


# ----------------------------------------------------------------------------- CLI

TABLE_COLUMNS = (
    ("gold", "gold_reward_mean"), ("gold_sd", "gold_reward_std"), ("proxy", "proxy_reward_mean"),
    ("kl", "kl_to_ref"), ("eos", "eos_rate"), ("len", "response_length_mean"), ("d1", "distinct_1"),
    ("d2", "distinct_2"), ("win_gold", "win_rate_vs_{b}_gold"), ("win_proxy", "win_rate_vs_{b}_proxy"),
    ("n", "n_samples"),
)


def format_table(metrics: dict[str, dict[str, Any]], baseline: str = "sft") -> str:
    """A fixed-width text table, one row per policy ('-' where a metric was not measured)."""
    header = ["policy"] + [c for c, _ in TABLE_COLUMNS]
    rows = [header]
    for name, m in metrics.items():
        row = [name]
        for _, key in TABLE_COLUMNS:
            v = m.get(key.format(b=baseline))
            row.append("-" if v is None else str(v) if isinstance(v, int) else f"{v:.3f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def _policy_arg(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    name, path = text.split("=", 1)
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    d = SamplingConfig()
    p = argparse.ArgumentParser(prog="rlhf-lightning evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", type=_policy_arg, action="append", required=True, metavar="NAME=PATH",
                   help="a policy export to evaluate (repeat the flag for several)")
    p.add_argument("--reference", required=True, help="KL reference policy (usually the SFT export)")
    p.add_argument("--reward_model", default=None, help="reward-model export for the proxy reward")
    p.add_argument("--prompts", required=True, help="held-out prompts file")
    p.add_argument("--out", default=None, help="directory for eval.json and eval_samples.jsonl")
    p.add_argument("--gold_reward", default="rlhf_lightning.data.demo:gold_reward",
                   help="module:function(prompt, response) -> float, or 'none'")
    p.add_argument("--baseline", default="sft", help="policy the win rates compare against")
    p.add_argument("--max_new_tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top_k", type=int, default=d.top_k)
    p.add_argument("--top_p", type=float, default=d.top_p)
    p.add_argument("--max_prompts", type=int, default=None)
    p.add_argument("--max_prompt_length", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``rlhf-lightning evaluate ...``: evaluate, print a table, write ``eval.json`` with ``--out``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    policies = dict(args.policy)
    if len(policies) != len(args.policy):
        raise SystemExit("each --policy needs a distinct name")
    gold = None if str(args.gold_reward).lower() in ("none", "null", "") else args.gold_reward
    result = evaluate_policies(
        policies, args.prompts, args.reference, reward_model=args.reward_model, gold_reward=gold,
        sampling=SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p),
        batch_size=args.batch_size, max_prompts=args.max_prompts, max_prompt_length=args.max_prompt_length,
        seed=args.seed, baseline=args.baseline, out_dir=args.out, device=args.device,
    )
    print(format_table(result["policies"], args.baseline))
    if args.out:
        print(f"\nwrote {Path(args.out) / 'eval.json'}; report: python -m rlhf_lightning.report RUN_DIR")
    return result


if __name__ == "__main__":
    main()
