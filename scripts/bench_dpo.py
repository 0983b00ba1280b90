"""DPO training throughput (pairs/s): plain PyTorch loop vs DPOModule on a Lightning Trainer.

  python scripts/bench_dpo.py --steps 20            # CPU; add --device cuda on a GPU

Setting: tiny Llama (4 layers, d=256, the demo tokenizer's vocabulary), 8 pairs per step,
prompt 64 + response 64 tokens, fp32, AdamW. A step is forward + backward + optimizer step,
reference forward included. Warm-up steps are not timed; with --repeat the best round is
reported (shared machines are noisy).

  (a) plain loop: separate chosen / rejected forwards for policy and reference
  (b) DPOModule through a Trainer (progress bar, logger, checkpointing off)
  (c) (b) with precompute_ref_logps (its one-off scoring pass reported separately)
"""

from __future__ import annotations

import argparse
import os
import time

import lightning as L
import torch
from torch.utils.data import DataLoader

from rlhf_lightning.data.collate import IGNORE_INDEX, PreferenceCollator
from rlhf_lightning.losses import dpo_loss
from rlhf_lightning.models import causal_lm_logits, freeze, load_causal_lm, load_tokenizer
from rlhf_lightning.systems.dpo import DPOModule

MODEL = {
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}


def make_pairs(n: int, vocab: int, prompt_len: int, response_len: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    feats = []
    for i in range(n):
        p, c, r = (
            torch.randint(3, vocab, (k,), generator=g).tolist() for k in (prompt_len, response_len, response_len)
        )
        feats.append(
            {
                "chosen_input_ids": p + c,
                "chosen_labels": [IGNORE_INDEX] * prompt_len + c,
                "rejected_input_ids": p + r,
                "rejected_labels": [IGNORE_INDEX] * prompt_len + r,
                "margin": None,
                "index": i,
            }
        )
    return feats


def plain_loop(tok, feats, batch_size, steps, warmup, device) -> float:
    """A textbook DPO loop: four forwards per step (policy/reference x chosen/rejected)."""
    torch.manual_seed(0)
    policy = load_causal_lm(None, tok, MODEL).to(device).train()
    ref = freeze(load_causal_lm(None, tok, MODEL)).to(device)
    ref.load_state_dict(policy.state_dict())
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    collate = PreferenceCollator(tok.pad_token_id)

    def logps(model, ids, mask, labels):
        logits = causal_lm_logits(model, ids, mask)[:, :-1]  # (B, T-1, V)
        lab = labels[:, 1:]
        keep = lab != IGNORE_INDEX
        lp = logits.log_softmax(-1).gather(-1, lab.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
        return (lp * keep).sum(-1)

    t0 = None
    for step, batch in enumerate(DataLoader(feats, batch_size=batch_size, collate_fn=collate)):
        if step == warmup:
            t0 = time.perf_counter()
        b = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        n = batch["num_pairs"]
        c = {k: v[:n] for k, v in b.items()}
        r = {k: v[n:] for k, v in b.items()}
        pc = logps(policy, c["input_ids"], c["attention_mask"], c["labels"])
        pr = logps(policy, r["input_ids"], r["attention_mask"], r["labels"])
        with torch.no_grad():
            rc = logps(ref, c["input_ids"], c["attention_mask"], c["labels"])
            rr = logps(ref, r["input_ids"], r["attention_mask"], r["labels"])
        loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - t0)


class _Data(L.LightningDataModule):
    def __init__(self, feats, batch_size, pad_id):
        super().__init__()
        self.feats, self.batch_size, self.collate = feats, batch_size, PreferenceCollator(pad_id)

    def train_dataloader(self):
        return DataLoader(self.feats, batch_size=self.batch_size, collate_fn=self.collate)

    def val_dataloader(self):
        return []


class _Timer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.t0, self.t1 = warmup, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.t1 = time.perf_counter()


def lightning_run(
    tokenizer_dir, tok, feats, batch_size, steps, warmup, device, precompute
) -> tuple[float, float | None]:
    torch.manual_seed(0)
    module = DPOModule(
        model_config=MODEL,
        tokenizer=tokenizer_dir,
        precompute_ref_logps=precompute,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-6),
    )
    timed = {}
    cache = module.cache_reference_logps

    def timed_cache(loaders):
        t = time.perf_counter()
        cache(loaders)
        timed["precompute"] = time.perf_counter() - t

    module.cache_reference_logps = timed_cache
    timer = _Timer(warmup)
    trainer = L.Trainer(
        accelerator="gpu" if device.startswith("cuda") else "cpu",
        devices=1,
        max_steps=warmup + steps,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=_Data(feats, batch_size, tok.pad_token_id))
    pairs_s = steps * batch_size / (timer.t1 - timer.t0)
    pre = len(feats) / timed["precompute"] if "precompute" in timed else None
    return pairs_s, (timed.get("precompute"), pre)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-pairs", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--response-len", type=int, default=64)
    ap.add_argument("--tokenizer", default="data/demo/tokenizer")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", default="abc", help="which rows to run, e.g. 'bc'")
    ap.add_argument("--repeat", type=int, default=1, help="interleaved rounds; the best is reported")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:  # on a shared CPU one thread can beat two that wait on each other
        torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.tokenizer)
    feats = make_pairs((args.steps + args.warmup) * args.batch_pairs, len(tok), args.prompt_len, args.response_len)
    print(
        f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, {len(tok)} vocab, "
        f"{args.batch_pairs} pairs x ({args.prompt_len}+{args.response_len}) tokens, {args.steps} timed steps "
        f"after {args.warmup} warm-up"
    )
    # Rounds interleave the three runs so background load hits them alike; best of the rounds is kept.
    best: dict[str, tuple[float, str]] = {}
    for _ in range(args.repeat):
        if "a" in args.only:
            rate = plain_loop(tok, feats, args.batch_pairs, args.steps, args.warmup, args.device)
            best["(a) plain PyTorch loop"] = max(best.get("(a) plain PyTorch loop", (0.0, "")), (rate, ""))
        if "b" in args.only:
            rate, _ = lightning_run(
                args.tokenizer, tok, feats, args.batch_pairs, args.steps, args.warmup, args.device, False
            )
            best["(b) DPOModule + Trainer"] = max(best.get("(b) DPOModule + Trainer", (0.0, "")), (rate, ""))
        if "c" in args.only:
            rate, (secs, pre) = lightning_run(
                args.tokenizer, tok, feats, args.batch_pairs, args.steps, args.warmup, args.device, True
            )
            note = f"precompute of {len(feats)} pairs: {secs:.2f} s ({pre:.0f} pairs/s)"
            best["(c) DPOModule + precompute"] = max(best.get("(c) DPOModule + precompute", (0.0, "")), (rate, note))
    print(f"\n| {'run':<28} | pairs/s | note")
    print(f"|{'-' * 30}|---------|-----")
    for name, (rate, note) in best.items():
        print(f"| {name:<28} | {rate:7.1f} | {note}")


if __name__ == "__main__":
    main()
