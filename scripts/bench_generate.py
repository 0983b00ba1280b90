"""Sampling throughput: HF ``generate`` against our decode loop, new tokens per second.

    python scripts/bench_generate.py                    # batch 16 and 64, 2 threads
    python scripts/bench_generate.py --threads 1 --repeats 9
    python scripts/bench_generate.py --variants         # also the loop's cache / attention choices
    python scripts/bench_generate.py --profile          # where one run's time goes, per engine

Settings match the issue's reference point: a random tiny GPT-2 (4 layers, d 256,
4 heads, vocabulary 4096), prompts of 16-48 tokens (random lengths, left-padded),
64 new tokens with ``min_new_tokens=64`` so every run generates all of them, T=1, no
top-k / top-p. Both engines run through ``sample_responses`` (``engine="hf"`` and
``"auto"``), alternating which goes first in each repeat. Reported: the median over
repeats of new tokens per wall-clock second and per CPU second of this process (the
latter is steadier on a shared machine), and our/HF ratios. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_gpt2(vocab: int, layers: int, d: int, heads: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=vocab,
        n_layer=layers,
        n_embd=d,
        n_head=heads,
        n_positions=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def prompts(batch: int, vocab: int, low: int = 16, high: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, Q)`` random left-padded prompts of ``low..high`` real tokens (pad 0, EOS 2 never inside)."""
    g = torch.Generator().manual_seed(seed + batch)
    lengths = torch.randint(low, high + 1, (batch,), generator=g)  # (B,)
    Q = int(lengths.max())
    mask = (torch.arange(Q)[None] >= Q - lengths[:, None]).long()  # (B, Q)
    ids = torch.randint(3, vocab, (batch, Q), generator=g) * mask  # (B, Q) pad id 0 on padding
    return ids, mask


def engines(args) -> dict:
    """name -> function(model, ids, mask, cfg) returning the (B, A) new tokens."""
    from rlhf_lightning.generation import decode_loop, sample_responses

    def through_sample_responses(engine):
        return lambda m, ids, mask, cfg: sample_responses(m, ids, mask, 2, 0, _with(cfg, engine)).response_ids

    out = {"hf": through_sample_responses("hf"), "ours": through_sample_responses("auto")}
    if args.variants:
        for cache in ("static", "dynamic"):
            for attention in ("auto", "model"):

                def variant(m, ids, mask, cfg, c=cache, a=attention):
                    return decode_loop(m, ids, mask, 2, 0, cfg, cache=c, attention=a)

                out[f"ours[{cache},{attention}]"] = variant
    return out


def _with(cfg, engine):
    from dataclasses import replace

    return replace(cfg, engine=engine)


def bench(model, batch: int, args) -> dict[str, dict[str, float]]:
    from rlhf_lightning.generation import SamplingConfig

    ids, mask = prompts(batch, args.vocab)
    cfg = SamplingConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    fns = engines(args)
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    with torch.no_grad():
        for r in range(args.warmup + args.repeats):
            order = list(fns) if r % 2 == 0 else list(fns)[::-1]  # alternate: no engine always runs first
            for name in order:
                w0, c0 = time.perf_counter(), time.process_time()
                out = fns[name](model, ids, mask, cfg)
                w, c = time.perf_counter() - w0, time.process_time() - c0
                assert out.shape == (batch, args.new_tokens), out.shape
                if r >= args.warmup:
                    wall[name].append(w)
                    cpu[name].append(c)
    n = batch * args.new_tokens
    return {
        name: {
            "tok_per_s": n / statistics.median(wall[name]),
            "tok_per_cpu_s": n / statistics.median(cpu[name]),
            "best_tok_per_s": n / min(wall[name]),
        }
        for name in fns
    }


def profile(model, batch: int, args) -> None:
    """Top operators of one run per engine (torch profiler, self CPU time)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from rlhf_lightning.generation import SamplingConfig

    ids, mask = prompts(batch, args.vocab)
    cfg = SamplingConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    for name, fn in engines(args).items():
        with torch.no_grad():
            fn(model, ids, mask, cfg)
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                fn(model, ids, mask, cfg)
        print(f"\n== {name}, batch {batch}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--variants", action="store_true", help="also time decode_loop's cache / attention choices")
    p.add_argument("--profile", action="store_true", help="print a profile of one run per engine and exit")
    p.add_argument("--profile-rows", type=int, default=20)
    p.add_argument("--json", help="write the results here as well")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    model = tiny_gpt2(args.vocab, args.layers, args.d, args.heads)
    if args.profile:
        for batch in args.batches:
            profile(model, batch, args)
        return
    results = {}
    print(f"threads={args.threads} new_tokens={args.new_tokens} repeats={args.repeats} (median)")
    print(f"{'batch':>5} {'engine':<22} {'tok/s':>8} {'x HF':>6} {'tok/cpu-s':>10} {'x HF':>6}")
    for batch in args.batches:
        res = bench(model, batch, args)
        hf = res["hf"]
        for name, r in res.items():
            r["ratio"] = r["tok_per_s"] / hf["tok_per_s"]
            r["cpu_ratio"] = r["tok_per_cpu_s"] / hf["tok_per_cpu_s"]
            print(
                f"{batch:>5} {name:<22} {r['tok_per_s']:>8.0f} {r['ratio']:>6.2f} {r['tok_per_cpu_s']:>10.0f} "
                f"{r['cpu_ratio']:>6.2f}"
            )
        results[batch] = res
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
