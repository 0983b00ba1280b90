"""Reward-model training throughput (pairs/s): plain PyTorch loops against the Lightning system.

    python scripts/bench_reward.py --steps 20

Three ways to run the same training step (forward, backward, AdamW step) on the same
tiny Llama reward model (4 layers, d=256, the demo tokenizer's vocabulary), batches of
``--pairs`` pairs of ``--prompt-len`` + ``--response-len`` tokens:

  (a) plain loop, two forwards per batch (chosen batch, then rejected batch);
  (b) plain loop, one forward over the concatenated (2B, T) batch;
  (c) ``RewardModule`` through a Lightning ``Trainer`` (no logger, no progress bar).

``--warmup`` steps are run first and excluded. Reports pairs/s over the timed steps
and from the median step time (more robust on a shared machine).
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch

from rlhf_lightning.losses import pairwise_loss
from rlhf_lightning.models import build_reward_model, load_tokenizer
from rlhf_lightning.systems.reward import RewardModule

MODEL_CONFIG = {
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}


def make_batches(n: int, pairs: int, length: int, vocab: int, pad_id: int, seed: int = 0) -> list[dict]:
    """``n`` preference batches in the ``PreferenceCollator`` layout, random non-pad tokens, no padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (2 * pairs, length), generator=g)  # (2B, T)
        ids[ids == pad_id] = 3
        out.append(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(), "num_pairs": pairs}
        )
    return out


def plain_loop(batches: list[dict], warmup: int, tokenizer, concatenated: bool, lr: float) -> list[float]:
    torch.manual_seed(0)
    rm = build_reward_model(None, tokenizer, dict(MODEL_CONFIG))
    rm.train()
    opt = torch.optim.AdamW(rm.parameters(), lr=lr)
    times = []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        B = batch["num_pairs"]
        ids, mask = batch["input_ids"], batch["attention_mask"]  # (2B, T)
        if concatenated:
            scores = rm(ids, mask, normalize=False)  # (2B,)
            chosen, rejected = scores[:B], scores[B:]
        else:
            chosen = rm(ids[:B], mask[:B], normalize=False)  # (B,)
            rejected = rm(ids[B:], mask[B:], normalize=False)  # (B,)
        loss, _ = pairwise_loss(chosen, rejected)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


class _StepTimer(L.Callback):
    """Time between consecutive ``on_train_batch_end`` calls: each step with every Lightning overhead."""

    def __init__(self, warmup: int):
        self.warmup, self.last, self.times = warmup, None, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if batch_idx >= self.warmup and self.last is not None:
            self.times.append(now - self.last)
        self.last = now


def lightning_loop(batches: list[dict], warmup: int, tokenizer_dir: str, lr: float) -> list[float]:
    torch.manual_seed(0)
    module = RewardModule(
        model_config=dict(MODEL_CONFIG), tokenizer=tokenizer_dir, optimizer=lambda p: torch.optim.AdamW(p, lr=lr)
    )
    timer = _StepTimer(warmup)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=len(batches),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=loader)
    return timer.times


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--pairs", type=int, default=8, help="pairs per batch")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--response-len", type=int, default=64)
    parser.add_argument("--tokenizer", default="data/demo/tokenizer")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the three variants, in turn")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = load_tokenizer(args.tokenizer)
    length = args.prompt_len + args.response_len
    batches = make_batches(args.warmup + args.steps, args.pairs, length, len(tokenizer), tokenizer.pad_token_id)
    # The variants run in turn, ``--repeats`` rounds, so drift of a shared machine hits all alike.
    results: dict[str, list[float]] = {
        "(a) plain, two forwards": [],
        "(b) plain, one concatenated forward": [],
        "(c) RewardModule + Lightning Trainer": [],
    }
    for _ in range(args.repeats):
        results["(a) plain, two forwards"] += plain_loop(batches, args.warmup, tokenizer, False, args.lr)
        results["(b) plain, one concatenated forward"] += plain_loop(batches, args.warmup, tokenizer, True, args.lr)
        results["(c) RewardModule + Lightning Trainer"] += lightning_loop(batches, args.warmup, args.tokenizer, args.lr)
    print(
        f"\nreward-model training step: {args.pairs} pairs x {length} tokens, {args.repeats} x {args.steps} timed "
        f"steps (+{args.warmup} warm-up each), {torch.get_num_threads()} threads, vocab {len(tokenizer)}"
    )
    print(f"{'variant':<40} {'pairs/s':>9} {'pairs/s (median step)':>22} {'ms/step (median)':>17}")
    for name, times in results.items():
        total = sum(times)
        median = statistics.median(times)
        print(f"{name:<40} {len(times) * args.pairs / total:>9.1f} {args.pairs / median:>22.1f} {median * 1e3:>17.1f}")
    return results


if __name__ == "__main__":
    main()
