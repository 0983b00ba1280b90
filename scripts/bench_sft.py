"""SFT throughput (tokens/s) on the tiny model: a plain PyTorch loop against SFTModule in a Trainer.

    python scripts/bench_sft.py --steps 20

Tiny Llama (4 layers, d=256), batch 8 x 256 tokens (prompt 64 + response 192, every
token real so both paths see exactly the same work), AdamW, fp32 on CPU. Warm-up steps
are excluded; the two paths run alternately ``--repeats`` times and the median step
time of each is reported. A Lightning step is timed from one batch start to the next,
so every hook and log call between steps is counted. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = {
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}


def make_batch(tok, batch: int, prompt: int, response: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(tok), (batch, prompt + response), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def plain_loop(tok, batch, steps: int, warmup: int) -> list[float]:
    from rlhf_lightning.models import load_causal_lm

    torch.manual_seed(0)
    model = load_causal_lm(None, tok, model_config=MODEL).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def lightning_module(tok_dir: str, batch, steps: int, warmup: int) -> list[float]:
    import lightning as L

    from rlhf_lightning.systems.sft import SFTModule

    torch.manual_seed(0)
    module = SFTModule(model_config=MODEL, tokenizer=tok_dir, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4))
    times = []

    class Timer(L.Callback):
        # Time from one batch start to the next, so data fetching, logging and every
        # hook the Trainer runs between steps are counted, not just the step itself.
        last = None

        def on_train_batch_start(self, trainer, pl_module, b, i):
            now = time.perf_counter()
            if self.last is not None and i > warmup:
                times.append(now - self.last)
            self.last = now

        def on_train_end(self, trainer, pl_module):
            times.append(time.perf_counter() - self.last)

    loader = torch.utils.data.DataLoader([batch] * (warmup + steps), batch_size=None)
    L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=warmup + steps,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Timer()],
    ).fit(module, train_dataloaders=loader)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--response", type=int, default=192)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each path")
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args()

    from rlhf_lightning.data.demo import write_demo_data
    from rlhf_lightning.models import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_demo_data(Path(tmp), seed=0, n_sft=2000, n_pairs=16, n_val_pairs=16, n_prompts=16, n_heldout=16)
        tok_dir = str(Path(tmp) / "tokenizer")
        tok = load_tokenizer(tok_dir)
        batch = make_batch(tok, args.batch, args.prompt, args.response)
        tokens = args.batch * (args.prompt + args.response)
        # Alternate the two paths so slow drift of the machine (other load, clocks)
        # hits both alike; the median over all timed steps of a path is reported.
        steps = {"plain loop": [], "SFTModule + Trainer": []}
        for _ in range(args.repeats):
            steps["plain loop"] += plain_loop(tok, batch, args.steps, args.warmup)
            steps["SFTModule + Trainer"] += lightning_module(tok_dir, batch, args.steps, args.warmup)
        results = {k: statistics.median(v) for k, v in steps.items()}
    print(f"{'path':<22}{'s/step':>8}{'tokens/s':>10}")
    for name, t in results.items():
        print(f"{name:<22}{t:>8.3f}{tokens / t:>10.0f}")
    ratio = results["plain loop"] / results["SFTModule + Trainer"]
    print(f"Lightning / plain throughput: {ratio:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({k: tokens / v for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
