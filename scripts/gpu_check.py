"""The GPU check: SFT, reward, DPO and online RL for a few steps on a ~0.5B model, bf16, LoRA, FSDP2.

    python scripts/gpu_check.py prepare --root /tmp/gpu_check        # data + a random Qwen2-0.5B-shaped model
    python scripts/gpu_check.py run --root /tmp/gpu_check --check sft_bf16 [--json out.json]
    bash scripts/gpu_check.sh [OUT_DIR]                               # everything, one check per process

The model has Qwen2-0.5B's shape (24 layers, d 896, 14 heads / 2 KV heads, MLP 4864,
tied embeddings) with random weights and the demo tokenizer's small vocabulary (nothing is
downloaded), so ~0.36B parameters. Each check runs a Lightning Trainer on one GPU (the
``*_fsdp2_*`` checks under FSDP2: ``ModelParallelStrategy``, data parallel over ``--devices``
GPUs, by default one: the sharded code paths, not a speed-up) and prints one JSON line (rank
0's figures, per device): step time
(median after warm-up), tokens/s and samples/s, peak GPU memory, and MFU against the GPU's
dense bf16 peak. The FLOPs counted are those the step must do: ``2N`` per token and forward
pass, ``4N`` per token for a full backward (``2N`` with LoRA: no weight gradients for the
frozen base), plus attention ``4 * layers * d * context`` per forward token (x3 with a
backward); ``N`` counts the weights of every linear layer, the output head included. Generation is reported as
tokens/s, not in the MFU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QWEN2_05B = {
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
}
# Dense bf16 tensor-core peaks (TFLOP/s), by a substring of torch.cuda.get_device_name().
BF16_PEAK = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}
LORA = {"r": 16, "alpha": 32, "target_modules": "all-linear"}
# --tiny: the same code paths on a model small enough for a CPU smoke test of this script.
TINY = {**QWEN2_05B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
MODEL = dict(QWEN2_05B)
SYNC = True  # torch.cuda.synchronize around steps (off on CPU)


# ----------------------------------------------------------------------------- preparation
def prepare(root: Path) -> None:
    import torch

    from rlhf_lightning.data.demo import write_demo_data
    from rlhf_lightning.models import build_reward_model, load_causal_lm, load_tokenizer, save_hf

    write_demo_data(root / "data", seed=0)
    # Longer SFT examples than the demo's (~400 tokens) so the SFT step is a real GPU workload.
    records = [json.loads(line) for line in (root / "data/sft.jsonl").read_text().splitlines()]
    with (root / "data/sft_long.jsonl").open("w") as f:
        for i in range(0, len(records) - 8, 8):
            response = " ".join(r["response"].strip() for r in records[i : i + 8])
            f.write(json.dumps({"prompt": records[i]["prompt"], "response": " " + response}) + "\n")
    tok = load_tokenizer(str(root / "data/tokenizer"))
    torch.manual_seed(0)
    save_hf(load_causal_lm(None, tok, model_config=dict(MODEL)), tok, root / "base")
    build_reward_model(str(root / "base"), tok).save_pretrained(root / "rm", tok)
    print(json.dumps({"prepared": str(root), "vocab": len(tok)}))


# ----------------------------------------------------------------------------- measurement
def linear_params(model) -> int:
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def peak_tflops(override: float | None) -> tuple[float | None, str]:
    import torch

    name = torch.cuda.get_device_name()
    if override:
        return override, name
    for key, value in BF16_PEAK.items():
        if key in name:
            return value, name
    return None, name


class Meter:
    """Times training steps (synchronised) and counts the tokens of each batch."""

    def __init__(self, warmup: int):
        import lightning as L
        import torch

        self.warmup, self.steps, self.tokens, self.samples = warmup, [], [], []
        meter = self

        class Callback(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if SYNC:
                    torch.cuda.synchronize()
                self.t0 = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if SYNC:
                    torch.cuda.synchronize()
                meter.steps.append(time.perf_counter() - self.t0)
                masks = [v for k, v in batch.items() if k.endswith("attention_mask")]
                meter.tokens.append(int(sum(int(m.sum()) for m in masks)))
                meter.samples.append(int(masks[0].shape[0]))
                meter.metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}

        self.callback = Callback()

    def summary(self) -> dict[str, float]:
        steps, tokens = self.steps[self.warmup :], self.tokens[self.warmup :]
        step = statistics.median(steps)
        return {
            "steps_measured": len(steps),
            "step_s": step,
            "tokens_per_step": statistics.mean(tokens),
            "tokens_per_s": sum(tokens) / sum(steps),
            "samples_per_s": statistics.mean(self.samples[self.warmup :]) / step,
        }


def trainer_for(check: str, steps: int, meter: Meter, precision: str, devices: int = 1):
    import lightning as L

    strategy = "auto"
    if "fsdp" in check:
        # FSDP2: the system's configure_model shards its models (models/sharding.py) over
        # ``devices`` ranks. Lightning's FSDPStrategy (FSDP v1) fails online RL (several policy
        # forwards a step).
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    else:
        devices = 1
    return L.Trainer(
        accelerator="gpu" if SYNC else "cpu",
        devices=devices,
        strategy=strategy,
        precision=precision,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[meter.callback],
    )


def run_check(check: str, root: Path, steps: int, warmup: int, peak: float | None, devices: int = 1) -> dict:
    import lightning as L
    import torch

    from rlhf_lightning.data.datamodules import PreferenceDataModule, PromptDataModule, SFTDataModule
    from rlhf_lightning.generation import SamplingConfig
    from rlhf_lightning.models import LoraSettings

    L.seed_everything(0)
    base, rm, data, tok = str(root / "base"), str(root / "rm"), root / "data", str(root / "data/tokenizer")
    lora = LoraSettings(**LORA) if "lora" in check else None
    precision = "bf16-true" if "true" in check else "bf16-mixed"
    meter = Meter(warmup)
    adamw = lambda params: torch.optim.AdamW(params, lr=1e-5)  # noqa: E731
    info: dict = {"check": check, "precision": precision, "lora": lora is not None, "fsdp": "fsdp" in check}
    engine = "auto" if "ourloop" in check else "hf"
    sampling = SamplingConfig(max_new_tokens=64, min_new_tokens=64, engine=engine)

    if check.startswith("sft"):
        from rlhf_lightning.systems.sft import SFTModule

        module = SFTModule(model=base, optimizer=adamw, lora=lora)
        dm = SFTDataModule(
            tokenizer=tok, train_file=str(data / "sft_long.jsonl"), val_fraction=0.0, batch_size=16,
            max_prompt_length=64, max_response_length=512,
        )  # fmt: skip
        passes = {"fwd": 1, "bwd": 1}
    elif check.startswith("reward"):
        from rlhf_lightning.systems.reward import RewardModule

        module = RewardModule(model=base, optimizer=adamw, lora=lora)
        dm = PreferenceDataModule(
            tokenizer=tok, train_file=str(data / "preferences_train.jsonl"), val_fraction=0.0, batch_size=32
        )
        passes = {"fwd": 1, "bwd": 1}
    elif check.startswith("dpo"):
        from rlhf_lightning.systems.dpo import DPOModule

        module = DPOModule(model=base, optimizer=adamw, lora=lora)
        dm = PreferenceDataModule(
            tokenizer=tok, train_file=str(data / "preferences_train.jsonl"), val_fraction=0.0, batch_size=32
        )
        passes = {"fwd": 2, "bwd": 1}  # policy forward + backward, reference forward
    else:  # online RL: ppo (critic) or grpo (reward function)
        from rlhf_lightning.systems.online_rl import OnlineRLModule

        method = check.split("_")[0]
        kw = dict(model=base, optimizer=adamw, lora=lora, sampling=sampling, sample_log_every_n_steps=0, stage=method)
        if method == "ppo":
            kw.update(reward_model=rm, estimator="gae", num_samples=1, ppo_epochs=2)
        else:
            from rlhf_lightning.rl.rewards import RewardFunctionSpec

            kw.update(
                reward_functions=[RewardFunctionSpec("rlhf_lightning.data.demo:gold_reward_batch")],
                estimator="grpo", num_samples=4, kl_in_loss=True, kl_estimator="k3", init_kl_coef=0.04,
                kl_target=None, whiten_advantages=False, ppo_epochs=1, loss_aggregation="seq_mean_token_mean",
            )  # fmt: skip
        module = OnlineRLModule(**kw)
        dm = PromptDataModule(
            tokenizer=tok, train_file=str(data / "prompts_train.jsonl"), val_fraction=0.0, batch_size=16
        )
        passes = None

    if SYNC:
        torch.cuda.reset_peak_memory_stats()
    # max_steps counts optimizer steps: PPO takes ppo_epochs of them per rollout.
    optimizer_steps = steps * (module.hparams.get("ppo_epochs", 1) if passes is None else 1)
    trainer = trainer_for(check, optimizer_steps, meter, precision, devices)
    info["devices"] = trainer.num_devices
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    info["wall_s"] = round(time.perf_counter() - t0, 1)
    if SYNC:
        info["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    info.update(meter.summary())
    trained = getattr(module, "policy", None) or module.reward_model
    info["trainable_params"] = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    info["params"] = sum(p.numel() for p in trained.parameters())
    n = linear_params(trained)
    info["linear_params"] = n
    if passes is not None and peak:
        cfg = MODEL
        ctx = info["tokens_per_step"] / max(1, meter.samples[-1])  # mean tokens per sequence
        attn = 4 * cfg["num_hidden_layers"] * cfg["hidden_size"] * ctx
        bwd = 2 if lora is not None else 4
        per_token = passes["fwd"] * (2 * n + attn) + passes["bwd"] * (bwd * n + 2 * attn)
        info["flops_per_token"] = per_token
        info["mfu"] = per_token * info["tokens_per_s"] / (peak * 1e12)
    if passes is None:
        m = meter.metrics
        for key in ("time_generate", "time_score", "time_learn", "reward", "kl"):
            value = m.get(f"{check.split('_')[0]}/{key}")
            if value is not None:
                info[key] = value
        new_tokens = dm.hparams.batch_size * module.hparams.num_samples * sampling.max_new_tokens
        if "time_generate" in info:
            info["generated_tokens_per_s"] = new_tokens / info["time_generate"]
        info["samples_per_s"] = dm.hparams.batch_size * module.hparams.num_samples / info["step_s"]
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["prepare", "run"])
    parser.add_argument("--root", default="/tmp/gpu_check")
    parser.add_argument("--check", default="sft_bf16")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--json", default=None, help="append the result line to this file")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: a smoke test of this script")
    parser.add_argument(
        "--devices", type=int, default=1, help="ranks of the *_fsdp2_* checks (the figures are rank 0's, per device)"
    )
    args = parser.parse_args()
    root = Path(args.root)
    global SYNC
    if args.tiny:
        MODEL.update(TINY)
        SYNC = False
    if args.command == "prepare":
        prepare(root)
        return
    import torch

    if SYNC and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (--tiny runs the checks on the CPU)")
    torch.backends.cuda.matmul.allow_tf32 = True
    peak, name = peak_tflops(args.peak_tflops) if SYNC else (None, "cpu")
    try:
        info = run_check(args.check, root, args.steps, args.warmup, peak, args.devices)
        info.update(device=name, peak_bf16_tflops=peak, status="ok")
    except Exception as err:  # one failing check must not hide the others' results
        import traceback

        traceback.print_exc()
        info = {"check": args.check, "device": name, "status": f"failed: {type(err).__name__}: {err}"[:600]}
    if int(os.environ.get("LOCAL_RANK", 0)) != 0:  # Lightning's other ranks: rank 0 reports
        return
    line = json.dumps(info)
    print(line, flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
