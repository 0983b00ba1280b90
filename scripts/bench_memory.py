"""Peak memory and throughput of DPO and PPO learning steps: full logits vs chunked log-probs.

  python scripts/bench_memory.py                       # CPU: memory at 128k vocab, then throughput at 4k
  python scripts/bench_memory.py --device cuda         # the same on a GPU
  python scripts/bench_memory.py --skip-throughput     # memory only
  python scripts/bench_memory.py --tie-embeddings      # one embedding/head matrix (most small models)

A learning step is what DPOModule and OnlineRLModule do per micro-batch: the policy's
log-probs through ``models.response_logprobs`` (DPO: ``systems.dpo.sequence_logps`` on
``(2B, T)`` chosen+rejected rows, the frozen reference's under no_grad as well; PPO: a
rollout-shaped ``(B, Q + A)`` batch and the clipped surrogate), backward, and an AdamW
step. Variants:

  plain       ``logprob_chunk_size=None``: the (rows, A, V) logits, as before
  chunked     the default: ``logprobs.chunked_token_logprobs`` (backward recomputes a chunk)
  checkpoint  the same chunks with ``torch.utils.checkpoint`` per chunk instead (for comparison)

Memory: every (task, variant) runs in a fresh subprocess; it builds the model and optimizer,
runs one warm-up step (AdamW state exists afterwards), then measures the second step:
on CUDA ``torch.cuda.max_memory_allocated``; on CPU the resident-set high-water mark
(``VmHWM``, reset through ``/proc/self/clear_refs``; large blocks are mmapped so freed
memory leaves the RSS). Reported, in MiB: ``learn``, the peak of the learning pass
(forward + backward, what the log-prob path changes), and ``step``, the peak of the whole
step with AdamW's update; each also minus what was resident before the step (weights
and optimizer state), i.e. the pass's working memory.
Throughput: steps/s after warm-up on the 4k-vocabulary model, best of ``--repeat`` rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM

import rlhf_lightning.models.forward as forward
from rlhf_lightning import logprobs as lp
from rlhf_lightning.data.collate import IGNORE_INDEX
from rlhf_lightning.losses import dpo_loss, ppo_policy_loss
from rlhf_lightning.models import disable_dropout, freeze, response_logprobs
from rlhf_lightning.systems.dpo import sequence_logps

MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)


def build(vocab: int, device: str, seed: int = 0, tie: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        "llama", vocab_size=vocab, max_position_embeddings=1024, tie_word_embeddings=tie, **MODEL
    )
    return disable_dropout(AutoModelForCausalLM.from_config(config).to(device).train())


def checkpointed_logprobs(hidden, weight, labels, bias=None, temperature=1.0, softcap=None, chunk_size=1024, *_):
    """The chunks of ``chunked_token_logprobs`` with torch.utils.checkpoint per chunk (no custom backward)."""

    def one(h, y):
        z = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())
        if softcap is not None:
            z = torch.tanh(z / softcap) * softcap
        return lp.token_logprobs(z[None], y[None], temperature)[0]

    parts = [
        checkpoint(one, hidden[s : s + chunk_size], labels[s : s + chunk_size], use_reentrant=False)
        for s in range(0, hidden.shape[0], chunk_size)
    ]
    return torch.cat(parts), None


def make_batches(task: str, vocab: int, args, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if task == "dpo":  # chosen rows then rejected rows sharing the prompt, right-padded
        prompt = torch.randint(3, vocab, (args.batch, args.prompt_len), generator=g).repeat(2, 1)
        response = torch.randint(3, vocab, (2 * args.batch, args.response_len), generator=g)
        ids = torch.cat([prompt, response], 1)  # (2B, T)
        labels = ids.clone()
        labels[:, : args.prompt_len] = IGNORE_INDEX
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        return {k: v.to(device) for k, v in batch.items()}
    ids = torch.randint(3, vocab, (args.batch, args.prompt_len + args.response_len), generator=g)  # (B, Q + A)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "old_logprobs": (-torch.rand(args.batch, args.response_len, generator=g) * 5).to(device),  # (B, A)
        "advantages": torch.randn(args.batch, args.response_len, generator=g).to(device),  # (B, A)
    }


def make_step(task: str, vocab: int, chunk: int | None, args, device: str):
    """Two closures: the learning pass (forward + backward) and the optimizer update."""
    policy = build(vocab, device, tie=args.tie_embeddings)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5, fused=args.fused_adamw or None)
    batch = make_batches(task, vocab, args, device)
    if task == "dpo":
        ref = freeze(build(vocab, device, tie=args.tie_embeddings))
        n = args.batch

        def learn() -> None:
            logps = sequence_logps(policy, batch, chunk_size=chunk)  # (2B,)
            with torch.no_grad():
                ref_logps = sequence_logps(ref, batch, chunk_size=chunk)  # (2B,)
            loss, _ = dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], beta=0.1)
            loss.backward()

    else:
        mask = torch.ones_like(batch["advantages"])  # (B, A)

        def learn() -> None:
            ids, attn = batch["input_ids"], batch["attention_mask"]
            out = response_logprobs(policy, ids, attn, args.prompt_len, chunk_size=chunk)  # (B, A)
            loss, _ = ppo_policy_loss(out.logprobs, batch["old_logprobs"], batch["advantages"], mask)
            loss.backward()

    def update() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    return learn, update


def chunk_of(variant: str, chunk_size: int | str) -> int | str | None:
    if variant == "checkpoint":
        forward.chunked_token_logprobs = checkpointed_logprobs
    return None if variant == "plain" else chunk_size


def rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def measure_memory(task: str, variant: str, args) -> dict:
    """One fresh process: warm-up step, then the peaks of the second step's two phases."""
    learn, update = make_step(task, args.vocab, chunk_of(variant, args.chunk_size), args, args.device)
    learn()
    update()
    cuda = args.device == "cuda"

    def reset() -> float:  # the current footprint, from which the next peak is measured
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated() / 2**20
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        return rss_mib("VmRSS:")

    def peak() -> float:
        if cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        return rss_mib("VmHWM:")

    base = reset()
    learn()
    learn_peak = peak()
    update()
    step_peak = max(learn_peak, peak())
    r = {"learn": learn_peak, "learn_ws": learn_peak - base, "step": step_peak, "step_ws": step_peak - base}
    return {"task": task, "variant": variant, "base": round(base, 1)} | {k: round(v, 1) for k, v in r.items()}


def measure_throughput(task: str, variant: str, args) -> float:
    learn, update = make_step(task, args.small_vocab, chunk_of(variant, args.chunk_size), args, args.device)

    def step() -> None:
        learn()
        update()

    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    best = 0.0
    for _ in range(args.repeat):
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        best = max(best, args.steps / (time.perf_counter() - t0))
    forward.chunked_token_logprobs = lp.chunked_token_logprobs
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--vocab", type=int, default=128256, help="vocabulary of the memory runs (Llama 3's)")
    p.add_argument("--small-vocab", type=int, default=4096, help="vocabulary of the throughput runs")
    p.add_argument("--batch", type=int, default=4, help="DPO pairs / PPO samples per step")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--response-len", type=int, default=256)
    p.add_argument("--chunk-size", type=lambda s: s if s == "auto" else int(s), default=forward.DEFAULT_CHUNK_SIZE)
    p.add_argument("--variants", default="plain,chunked,checkpoint")
    p.add_argument("--tasks", default="dpo,ppo")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tie-embeddings", action="store_true", help="one matrix for embeddings and head")
    p.add_argument("--fused-adamw", action="store_true", help="AdamW(fused=True): no parameter-sized temporaries")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--worker", nargs=2, metavar=("TASK", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(measure_memory(*args.worker, args)))
        return
    tasks, variants = args.tasks.split(","), args.variants.split(",")
    tied = ", tied embeddings" if args.tie_embeddings else ""
    setting = f"llama d=256 x4 layers{tied}, {args.batch} x ({args.prompt_len} + {args.response_len}) tokens, fp32"
    print(f"device={args.device} torch={torch.__version__} chunk_size={args.chunk_size}; {setting}")
    if not args.skip_memory:
        print(f"\npeak memory, vocab {args.vocab} (MiB; [working] = peak - resident before the step)")
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # freed blocks go back to the OS
        for task in tasks:
            rows = {}
            for variant in variants:
                cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", task, variant]
                out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
                rows[variant] = json.loads(out.strip().splitlines()[-1])
            plain = rows.get("plain")
            for variant, r in rows.items():
                cells = []
                for k in ("learn", "step"):
                    x, xw = (plain[k] / r[k], plain[f"{k}_ws"] / r[f"{k}_ws"]) if plain else (float("nan"),) * 2
                    cells.append(f"{k} {r[k]:7.1f} [{r[f'{k}_ws']:7.1f}] ({x:.2f}x [{xw:.2f}x])")
                print(f"  {task} {variant:<10} " + "  ".join(cells) + f"  resident before {r['base']:.0f}")
    if not args.skip_throughput:
        print(f"\nthroughput, vocab {args.small_vocab} (steps/s, best of {args.repeat} x {args.steps} steps)")
        for task in tasks:
            speed = {v: measure_throughput(task, v, args) for v in variants}
            for variant, s in speed.items():
                rel = s / speed["plain"] if "plain" in speed else float("nan")
                print(f"  {task} {variant:<10} {s:8.2f} steps/s  ({rel:.2f}x plain)")


if __name__ == "__main__":
    main()
