"""LoRA against full fine-tuning on the demo model: trainable parameters and step time.

    python scripts/bench_lora.py                 # SFT and DPO, r=16, 3 rounds
    python scripts/bench_lora.py --stages sft --rank 8

The demo's SFT model (configs/sft.yaml: Llama, 4 layers, d 256, tied embeddings) on the
demo data, batch 32 (SFT examples / DPO pairs), fp32, 2 threads. Each variant runs in its
own process and the variants alternate in every round; reported: trainable parameters and
the median training-step time (after warm-up), and the LoRA/full ratio per round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEMO_MODEL = {
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}


def prepare(root: Path) -> None:
    import torch

    from rlhf_lightning.data.demo import write_demo_data
    from rlhf_lightning.models import load_causal_lm, load_tokenizer, save_hf

    write_demo_data(root / "data", seed=0, n_sft=2000, n_pairs=2000, n_val_pairs=16, n_prompts=16, n_heldout=16)
    tok = load_tokenizer(str(root / "data/tokenizer"))
    torch.manual_seed(0)
    save_hf(load_causal_lm(None, tok, model_config=dict(DEMO_MODEL)), tok, root / "sft")


def worker(stage: str, lora: int, root: Path, warmup: int, steps: int) -> dict:
    import lightning as L

    from rlhf_lightning.data.datamodules import PreferenceDataModule, SFTDataModule
    from rlhf_lightning.models import LoraSettings

    L.seed_everything(0)
    settings = LoraSettings(r=lora, alpha=2 * lora) if lora else None
    tok = str(root / "data/tokenizer")
    if stage == "sft":
        from rlhf_lightning.systems.sft import SFTModule

        module = SFTModule(model=str(root / "sft"), lora=settings)
        dm = SFTDataModule(tokenizer=tok, train_file=str(root / "data/sft.jsonl"), val_fraction=0.0, batch_size=32)
    else:
        from rlhf_lightning.systems.dpo import DPOModule

        module = DPOModule(model=str(root / "sft"), lora=settings)
        dm = PreferenceDataModule(
            tokenizer=tok, train_file=str(root / "data/preferences_train.jsonl"), val_fraction=0.0, batch_size=32
        )
    times: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            times.append(time.perf_counter() - self.t0)

    L.Trainer(
        accelerator="cpu",
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[Timer()],
    ).fit(module, datamodule=dm)
    policy = module.policy
    return {
        "trainable": sum(p.numel() for p in policy.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in policy.parameters()),
        "step_s": statistics.median(times[warmup:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="sft,dpo")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)  # stage, rank, root
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        stage, rank, root = args.worker
        print(json.dumps(worker(stage, int(rank), Path(root), args.warmup, args.steps)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        prepare(Path(tmp))
        for stage in args.stages.split(","):
            runs: dict[int, list[dict]] = {0: [], args.rank: []}
            for _ in range(args.rounds):
                for rank in runs:
                    cmd = [sys.executable, __file__, "--worker", stage, str(rank), tmp]
                    cmd += ["--warmup", str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads)]
                    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
                    runs[rank].append(json.loads(out.stdout.strip().splitlines()[-1]))
            full, lora = runs[0], runs[args.rank]
            ratio = statistics.median(b["step_s"] / a["step_s"] for a, b in zip(full, lora, strict=True))
            for name, rs in (("full", full), (f"LoRA r={args.rank}", lora)):
                step = statistics.median(r["step_s"] for r in rs)
                counts = f"trainable {rs[0]['trainable']:>10,} of {rs[0]['total']:>10,}"
                print(f"{stage:4s} {name:10s} {counts}  step {step:.3f} s")
            print(f"{stage:4s} LoRA/full step time (median of per-round ratios): {ratio:.2f}")


if __name__ == "__main__":
    main()
