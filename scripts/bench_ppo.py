"""PPO throughput on the tiny model: samples/s and the generate / score / learn split.

    python scripts/bench_ppo.py                      # separate critic
    python scripts/bench_ppo.py --shared-value-head  # value head on the policy

Settings match the issue's reference point: 4 layers, d=256, rollout batch 16, 64 new
tokens (forced: min_new_tokens=64), 4 PPO epochs, 1 minibatch. It also times the bare
cost of the learn phase on the same tensors (forward+backward+step of policy and critic,
4 times) so the overhead of the system itself is visible. Models are random-initialised
(timing does not depend on the weights); nothing is downloaded.
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


def build_exports(root: Path, vocab_texts: int = 2000) -> dict[str, str]:
    from rlhf_lightning.data.demo import write_demo_data
    from rlhf_lightning.models import build_reward_model, load_causal_lm, load_tokenizer, save_hf

    write_demo_data(root / "data", seed=0, n_sft=vocab_texts, n_pairs=16, n_val_pairs=16, n_prompts=64, n_heldout=16)
    tok = load_tokenizer(str(root / "data/tokenizer"))
    cfg = {
        "model_type": "llama",
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
    }
    torch.manual_seed(0)
    save_hf(load_causal_lm(None, tok, model_config=cfg), tok, root / "sft")
    build_reward_model(str(root / "sft"), tok).save_pretrained(root / "rm", tok)
    return {
        "sft": str(root / "sft"),
        "rm": str(root / "rm"),
        "tokenizer": str(root / "data/tokenizer"),
        "prompts": str(root / "data/prompts_train.jsonl"),
    }


def bench_module(paths: dict[str, str], args) -> dict[str, float]:
    import lightning as L

    from rlhf_lightning.data.datamodules import PromptDataModule
    from rlhf_lightning.generation import SamplingConfig
    from rlhf_lightning.systems.ppo import PPOModule

    L.seed_everything(0)
    module = PPOModule(
        model=paths["sft"],
        reward_model=paths["rm"],
        tokenizer=paths["tokenizer"],
        shared_value_head=args.shared_value_head,
        ppo_epochs=4,
        minibatch_size=args.batch,
        sampling=SamplingConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens),
        sample_log_every_n_steps=0,
    )
    dm = PromptDataModule(
        tokenizer=paths["tokenizer"],
        train_file=paths["prompts"],
        val_fraction=0.0,
        batch_size=args.batch,
        max_prompt_length=32,
    )
    times: list[dict[str, float]] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = trainer.callback_metrics
            times.append(
                {
                    "step": time.perf_counter() - self.t0,
                    "generate": float(m["ppo/time_generate"]),
                    "score": float(m["ppo/time_score"]),
                    "learn": float(m["ppo/time_learn"]),
                }
            )

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=4 * (args.warmup + args.steps),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[Timer()],
    )
    trainer.fit(module, datamodule=dm)
    measured = times[args.warmup :]
    out = {k: statistics.median(t[k] for t in measured) for k in measured[0]}
    out["samples_per_s"] = args.batch / out["step"]
    out["prompt_tokens"] = dm.hparams.max_prompt_length
    return out, module


def bench_bare_learn(module, args) -> float:
    """Forward+backward+optimizer step of policy and critic on one rollout's tensors, 4 epochs."""
    from rlhf_lightning.models import position_ids_from_mask

    B, A = args.batch, args.new_tokens
    ids = torch.randint(5, len(module.tokenizer), (B, 20 + A))
    mask = torch.ones_like(ids)
    pos = position_ids_from_mask(mask)
    params = [p for p in module.policy.parameters()] + [
        p for m in (module.critic, module.value_head) if m is not None for p in m.parameters()
    ]
    opt = torch.optim.AdamW(params, lr=1e-6)
    durations = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        for _ in range(4):
            out = module.policy(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                use_cache=False,
                logits_to_keep=A + 1,
                output_hidden_states=module.value_head is not None,
            )
            loss = torch.log_softmax(out.logits.float(), -1)[..., 0].mean()
            if module.critic is not None:
                loss = loss + module.critic.token_values(ids, mask)[:, -A - 1 : -1].mean()
            else:
                loss = loss + module.value_head(out.hidden_states[-1][:, -A - 1 : -1]).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            durations.append(time.perf_counter() - t0)
    return statistics.median(durations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--shared-value-head", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=str, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_exports(Path(tmp))
        result, module = bench_module(paths, args)
        result["bare_learn"] = bench_bare_learn(module, args)
    result["learn_over_bare"] = result["learn"] / result["bare_learn"]
    result["config"] = {
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "ppo_epochs": 4,
        "minibatches": 1,
        "critic": "shared value head" if args.shared_value_head else "separate",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    print(f"{'phase':<12}{'seconds':>10}")
    for k in ("generate", "score", "learn", "step"):
        print(f"{k:<12}{result[k]:>10.3f}")
    print(f"{'bare learn':<12}{result['bare_learn']:>10.3f}   (learn / bare = {result['learn_over_bare']:.2f})")
    print(f"samples/s: {result['samples_per_s']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
