"""Compare policies on held-out prompts: gold reward, proxy reward, KL to the reference, diversity.

``rlhf-lightning evaluate --policy sft=runs/demo/sft/hf --policy ppo=runs/demo/ppo/hf ...``
samples one response per held-out prompt from every policy with the same sampling
settings and the same seed, then reports per policy what the RLHF papers report:

* ``gold_reward_*``: a programmatic judge named with ``--gold_reward module:function``
  (``function(prompt, response) -> float``; none unless named);
* ``proxy_reward_mean``: the learned reward model (normalised scores);
* ``kl_to_ref``: Monte-Carlo ``KL(pi || pi_ref)``, the mean over samples of
  ``sum_t log pi(y_t) - log pi_ref(y_t)`` over response tokens (EOS included), both
  log-probs at the sampling temperature;
* win rates against a baseline policy's sample for the same prompt, EOS rate, length,
  and distinct-1/2.

Sampling and scoring (:mod:`rlhf_lightning.eval.sampling`) produce one record per
(policy, prompt); :func:`~rlhf_lightning.eval.metrics.aggregate_metrics` is a pure
function from those records to the metrics.
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from rlhf_lightning.eval.metrics import aggregate_metrics, metric_columns
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


def _same_path(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def evaluate_policies(
    policies: dict[str, str],
    prompts_file: str,
    reference: str,
    reward_model: str | None = None,
    gold_reward: str | None = None,
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
        gold_reward: ``module:function(prompt, response) -> float`` (None: skipped); the
            demo task's is ``rlhf_lightning.data.demo:gold_reward``.
        baseline: the policy win rates compare against.
        out_dir: when given, write ``eval.json`` and ``eval_samples.jsonl`` there.
        device: default ``cuda`` when available, else ``cpu``.

    Returns:
        ``{"policies": {name: metrics}, "settings": {...}}`` (the content of ``eval.json``).
    """
    from rlhf_lightning.data.collate import PromptCollator, tokenize_prompt
    from rlhf_lightning.data.records import load_examples
    from rlhf_lightning.models import load_tokenizer

    if not policies:
        raise ValueError("give at least one policy")
    sampling = sampling or SamplingConfig()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gold_fn = import_callable(gold_reward) if gold_reward else None
    if baseline not in policies:
        log.warning("baseline %r is not among the policies %s: no win rates", baseline, list(policies))

    tokenizer = load_tokenizer(reference, padding_side="left")
    examples = load_examples(prompts_file, "prompt", tokenizer=tokenizer)[:max_prompts]
    features = [tokenize_prompt(ex, tokenizer, max_prompt_length) for ex in examples]
    collate = PromptCollator(tokenizer.pad_token_id)
    batches = [collate(features[i : i + batch_size]) for i in range(0, len(features), batch_size)]

    ref_model = load_frozen_lm(reference, tokenizer).to(device)
    rm = None
    if reward_model:
        check_same_vocab(tokenizer, reward_model, "reward model")
        rm = load_frozen_reward_model(reward_model).to(device)

    records: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    for name, path in policies.items():
        t0 = time.perf_counter()
        is_ref = _same_path(path, reference)
        if not is_ref:
            check_same_vocab(tokenizer, path, f"policy {name!r}")
        model = ref_model if is_ref else load_frozen_lm(path, tokenizer).to(device)
        torch.manual_seed(seed)  # the same random stream for every policy
        index = 0
        for batch in batches:
            for row in sample_and_score(model, ref_model, rm, tokenizer, to_device(batch, device), sampling):
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
            "policies": dict(policies),
            "reference": reference,
            "reward_model": reward_model,
            "gold_reward": gold_reward,
            "prompts_file": prompts_file,
            "n_prompts": len(examples),
            "max_prompts": max_prompts,
            "max_prompt_length": max_prompt_length,
            "batch_size": batch_size,
            "seed": seed,
            "baseline": baseline,
            "sampling": asdict(sampling),
            "device": str(device),
            "seconds": seconds,
        },
    }
    if out_dir is not None:
        write_result(out_dir, "eval", result, records)
    return result


# ----------------------------------------------------------------------------- CLI


def format_table(metrics: dict[str, dict[str, Any]], baseline: str = "sft") -> str:
    """A fixed-width text table, one row per policy ('-' where a metric was not measured).

    Columns are :data:`~rlhf_lightning.eval.metrics.METRIC_COLUMNS` that some policy has
    (short headers), a column with a standard deviation followed by ``<short>_sd``.
    """
    cells: list[tuple[str, str]] = []  # (header, key)
    for c in metric_columns(metrics, baseline):
        cells.append((c.short, c.key))
        if c.std and any(c.std in m for m in metrics.values()):
            cells.append((f"{c.short}_sd", c.std))
    rows = [["policy"] + [h for h, _ in cells]]
    for name, m in metrics.items():
        row = [name]
        for _, key in cells:
            v = m.get(key)
            row.append("-" if v is None else str(v) if isinstance(v, int) else f"{v:.3f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in rows
    )


def _policy_arg(text: str) -> tuple[str, str]:
    name, _, path = text.partition("=")
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    """The ``rlhf-lightning evaluate`` arguments (sampling defaults from :class:`SamplingConfig`)."""
    d = SamplingConfig()
    p = argparse.ArgumentParser(prog="rlhf-lightning evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--policy",
        type=_policy_arg,
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a policy export to evaluate (repeat the flag for several)",
    )
    p.add_argument("--reference", required=True, help="KL reference policy (usually the SFT export)")
    p.add_argument("--reward_model", default=None, help="reward-model export for the proxy reward")
    p.add_argument("--prompts", required=True, help="held-out prompts file")
    p.add_argument("--out", default=None, help="directory for eval.json and eval_samples.jsonl")
    p.add_argument(
        "--gold_reward",
        default=None,
        help="module:function(prompt, response) -> float, e.g. rlhf_lightning.data.demo:gold_reward "
        "for the demo task (default: none)",
    )
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
        policies,
        args.prompts,
        args.reference,
        reward_model=args.reward_model,
        gold_reward=gold,
        sampling=SamplingConfig(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p
        ),
        batch_size=args.batch_size,
        max_prompts=args.max_prompts,
        max_prompt_length=args.max_prompt_length,
        seed=args.seed,
        baseline=args.baseline,
        out_dir=args.out,
        device=args.device,
    )
    print(format_table(result["policies"], args.baseline))
    if args.out:
        print(f"\nwrote {Path(args.out) / 'eval.json'}; report: python -m rlhf_lightning.report RUN_DIR")
    return result


if __name__ == "__main__":
    main()
