"""Best-of-n against the proxy reward model: the frontier that needs no training.

``rlhf-lightning best-of-n --policy runs/demo/sft/hf --reward_model runs/demo/reward/hf
--prompts_file data/demo/prompts_heldout.jsonl --gold_reward rlhf_lightning.data.demo:gold_reward
--n 1 2 4 8 16 32 64 --out_dir runs/sweep``

samples ``N = max(n)`` responses per held-out prompt from the policy (each prompt
repeated in the batch of one sampling pass), scores each with the proxy reward model and
the gold reward, and for every ``n`` reports the expected gold and proxy reward of the
proxy's pick among ``n`` samples (:func:`~rlhf_lightning.eval.frontier.best_of_n_estimate`,
all ``n``-subsets of the ``N`` samples, no resampling) with its KL from the policy,
``log n - (n - 1) / n`` (:func:`~rlhf_lightning.eval.frontier.bon_kl`), and ``d = sqrt(KL)``.
Means and standard errors are over prompts.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from rlhf_lightning.eval.frontier import best_of_n_estimate, bon_kl, mean_se
from rlhf_lightning.eval.sampling import (
    check_same_vocab,
    load_frozen_lm,
    load_frozen_reward_model,
    sample_and_score,
    to_device,
    write_result,
)
from rlhf_lightning.generation import SamplingConfig
from rlhf_lightning.importing import import_callable

log = logging.getLogger(__name__)

DEFAULT_NS = (1, 2, 4, 8, 16, 32, 64)


def best_of_n(
    policy: str,
    reward_model: str,
    prompts_file: str,
    gold_reward: str | Callable[[str, str], float],
    ns: Sequence[int] = DEFAULT_NS,
    max_prompts: int | None = None,
    sampling: SamplingConfig | None = None,
    batch_size: int = 64,
    seed: int = 0,
    out_dir: str | None = None,
    max_prompt_length: int = 64,
    device: str | None = None,
) -> dict[str, Any]:
    """Best-of-n curves of ``policy`` under ``reward_model`` (the proxy), measured by ``gold_reward``.

    Args:
        policy: the policy export sampled (usually the SFT export); also gives the tokenizer.
        reward_model: the proxy reward-model export that picks the best of ``n``.
        prompts_file: held-out prompt records (``{"prompt"}`` or ``{"messages"}``).
        gold_reward: ``module:function(prompt, response) -> float`` (or the function).
        ns: the ``n`` to report; ``max(ns)`` samples are drawn per prompt.
        batch_size: sequences per sampling pass (a prompt's samples may span passes).
        out_dir: when given, write ``best_of_n.json`` and ``best_of_n_samples.jsonl`` there.
        device: default ``cuda`` when available, else ``cpu``.

    Returns:
        ``{"points": [{"n", "kl", "d", "gold_mean", "gold_se", "proxy_mean", "proxy_se",
        "n_prompts"}, ...], "settings": {...}}`` (the content of ``best_of_n.json``), one
        point per ``n`` in increasing order. ``n = 1`` is the policy's own expected reward.
    """
    from rlhf_lightning.data.collate import PromptCollator, tokenize_prompt
    from rlhf_lightning.data.records import load_examples
    from rlhf_lightning.models import load_tokenizer

    ns = sorted({int(n) for n in ns})
    if not ns or ns[0] < 1:
        raise ValueError(f"every n must be a positive integer, got {ns}")
    n_samples = ns[-1]
    sampling = sampling or SamplingConfig()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gold_fn = import_callable(gold_reward)

    tokenizer = load_tokenizer(policy, padding_side="left")
    examples = load_examples(prompts_file, "prompt", tokenizer=tokenizer)[:max_prompts]
    if not examples:
        raise ValueError(f"no prompts in {prompts_file}")
    features = [tokenize_prompt(ex, tokenizer, max_prompt_length) for ex in examples]
    repeated = [f for f in features for _ in range(n_samples)]  # prompt k at rows k*N .. k*N + N-1
    collate = PromptCollator(tokenizer.pad_token_id)

    t0 = time.perf_counter()
    model = load_frozen_lm(policy, tokenizer).to(device)
    check_same_vocab(tokenizer, reward_model, "reward model")
    rm = load_frozen_reward_model(reward_model).to(device)
    torch.manual_seed(seed)
    records: list[dict[str, Any]] = []
    for start in range(0, len(repeated), batch_size):
        batch = to_device(collate(repeated[start : start + batch_size]), device)
        for row in sample_and_score(model, None, rm, tokenizer, batch, sampling):
            flat = len(records)
            row.pop("kl")  # no reference: best-of-n's KL is analytic
            row["gold"] = float(gold_fn(row["prompt"], row["response"]))
            records.append({"index": flat // n_samples, "sample": flat % n_samples, **row})
    seconds = time.perf_counter() - t0
    log.info("sampled and scored %d x %d responses in %.1fs", len(examples), n_samples, seconds)

    result = {"points": best_of_n_points(records, ns), "settings": {}}
    result["settings"] = {
        "policy": policy,
        "reward_model": reward_model,
        "gold_reward": gold_reward if isinstance(gold_reward, str) else repr(gold_reward),
        "prompts_file": prompts_file,
        "n_prompts": len(examples),
        "samples_per_prompt": n_samples,
        "ns": ns,
        "max_prompts": max_prompts,
        "max_prompt_length": max_prompt_length,
        "batch_size": batch_size,
        "seed": seed,
        "sampling": asdict(sampling),
        "device": str(device),
        "seconds": seconds,
    }
    if out_dir is not None:
        write_result(out_dir, "best_of_n", result, records)
    return result


def best_of_n_points(records: list[dict[str, Any]], ns: Sequence[int]) -> list[dict[str, Any]]:
    """One point per ``n`` from per-sample records ``{"index" (prompt), "proxy", "gold"}`` (pure).

    Each prompt's samples give :func:`best_of_n_estimate`; the point's means and standard
    errors (:func:`mean_se`) are over prompts (a standard error of one prompt is None).
    """
    by_prompt: dict[int, tuple[list[float], list[float]]] = {}
    for r in records:
        proxy, gold = by_prompt.setdefault(r["index"], ([], []))
        proxy.append(float(r["proxy"]))
        gold.append(float(r["gold"]))
    points = []
    for n in sorted(ns):
        estimates = [best_of_n_estimate(p, g, n) for p, g in by_prompt.values()]
        gold_mean, gold_se = mean_se([g for g, _ in estimates])
        proxy_mean, proxy_se = mean_se([p for _, p in estimates])
        kl = bon_kl(n)
        points.append(
            {
                "n": n,
                "kl": kl,
                "d": math.sqrt(kl),
                "gold_mean": gold_mean,
                "gold_se": _or_none(gold_se),
                "proxy_mean": proxy_mean,
                "proxy_se": _or_none(proxy_se),
                "n_prompts": len(estimates),
            }
        )
    return points


def _or_none(x: float) -> float | None:
    return None if math.isnan(x) else x


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The ``rlhf-lightning best-of-n`` arguments (sampling defaults from :class:`SamplingConfig`)."""
    d = SamplingConfig()
    p = argparse.ArgumentParser(prog="rlhf-lightning best-of-n", description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True, help="policy export sampled (usually the SFT export)")
    p.add_argument("--reward_model", required=True, help="proxy reward-model export that picks the best")
    p.add_argument("--prompts_file", required=True, help="held-out prompts file")
    p.add_argument(
        "--gold_reward",
        required=True,
        help="module:function(prompt, response) -> float, e.g. rlhf_lightning.data.demo:gold_reward",
    )
    p.add_argument("--n", type=int, nargs="+", default=list(DEFAULT_NS), help="the n to report (max(n) samples)")
    p.add_argument("--out_dir", default=None, help="directory for best_of_n.json and best_of_n_samples.jsonl")
    p.add_argument("--max_new_tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top_k", type=int, default=d.top_k)
    p.add_argument("--top_p", type=float, default=d.top_p)
    p.add_argument("--max_prompts", type=int, default=None)
    p.add_argument("--max_prompt_length", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    return p


def format_points(points: list[dict[str, Any]]) -> str:
    """A fixed-width text table of best-of-n points."""
    lines = [f"{'n':>4}  {'KL':>6}  {'d':>6}  {'gold':>8}  {'± s.e.':>7}  {'proxy':>8}"]
    for p in points:
        se = "–" if p["gold_se"] is None else f"{p['gold_se']:.3f}"
        lines.append(
            f"{p['n']:>4}  {p['kl']:>6.3f}  {p['d']:>6.3f}  {p['gold_mean']:>8.3f}  {se:>7}  {p['proxy_mean']:>8.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``rlhf-lightning best-of-n ...``: measure, print a table, write ``best_of_n.json`` with ``--out_dir``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = best_of_n(
        args.policy,
        args.reward_model,
        args.prompts_file,
        args.gold_reward,
        ns=args.n,
        max_prompts=args.max_prompts,
        sampling=SamplingConfig(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p
        ),
        batch_size=args.batch_size,
        seed=args.seed,
        out_dir=args.out_dir,
        max_prompt_length=args.max_prompt_length,
        device=args.device,
    )
    print(format_points(result["points"]))
    if args.out_dir:
        print(f"\nwrote {Path(args.out_dir) / 'best_of_n.json'}")
    return result


if __name__ == "__main__":
    main()
