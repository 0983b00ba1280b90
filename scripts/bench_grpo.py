"""GRPO and RLOO throughput: this project beside TRL, same model, lengths and threads.

    python scripts/bench_grpo.py                                   # ours only
    python scripts/bench_grpo.py --trl-python /path/to/trl-venv/bin/python --rounds 3

The peer setting of the reference numbers: a GPT-2 of 4 layers, d 256 (random weights:
timing does not depend on them), 16 completions per step (4 prompts x 4), exactly 64 new
tokens (EOS suppressed until then), beta 0.05 with the k3 term in the loss, one update per
batch, fp32, no gradient checkpointing, 2 threads. Rewards come from one cheap reward
function. Each variant runs in its own process; variants alternate within every round,
and the report gives medians over rounds and, against TRL, the median of the ratios
measured within each round.

TRL runs in its own virtualenv (``pip install trl==1.16.0 torch``); it reads the same
exported model, tokenizer and prompts. The split: ``generate`` is the sampling call,
``score`` the reward function (ours: + the reference and rollout forwards), ``rest`` the
remainder of the step (TRL: reference forward and the update; ours: the update).
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

PROMPTS_PER_STEP, NUM_GENERATIONS, NEW_TOKENS, BETA, LR = 4, 4, 64, 0.05, 1e-6
GPT2 = {"model_type": "gpt2", "n_layer": 4, "n_embd": 256, "n_head": 4, "n_positions": 256}


def bench_reward(prompts, completions, **kwargs) -> list[float]:
    """Cheap and deterministic: distinct words per completion, scaled."""
    return [len(set(c.split())) / 10.0 for c in completions]


# ----------------------------------------------------------------------------- shared inputs
def build_inputs(root: Path) -> dict[str, str]:
    import torch

    from rlhf_lightning.data.demo import write_demo_data
    from rlhf_lightning.models import load_causal_lm, load_tokenizer, save_hf

    write_demo_data(root / "data", seed=0, n_sft=2000, n_pairs=16, n_val_pairs=16, n_prompts=256, n_heldout=16)
    tok = load_tokenizer(str(root / "data/tokenizer"))
    torch.manual_seed(0)
    save_hf(load_causal_lm(None, tok, model_config=dict(GPT2)), tok, root / "policy")
    return {"policy": str(root / "policy"), "prompts": str(root / "data/prompts_train.jsonl")}


# ----------------------------------------------------------------------------- workers
def summarise(steps: list[dict[str, float]], warmup: int) -> dict[str, float]:
    measured = steps[warmup:]
    out = {k: statistics.median(s[k] for s in measured) for k in measured[0]}
    out["samples_per_s"] = PROMPTS_PER_STEP * NUM_GENERATIONS / out["step"]
    return out


def run_ours(method: str, inputs: dict[str, str], warmup: int, steps: int, engine: str) -> dict[str, float]:
    import lightning as L
    import torch

    from rlhf_lightning.data.datamodules import PromptDataModule
    from rlhf_lightning.generation import SamplingConfig
    from rlhf_lightning.rl.rewards import RewardFunctionSpec
    from rlhf_lightning.systems.online_rl import OnlineRLModule

    L.seed_everything(0)
    module = OnlineRLModule(
        model=inputs["policy"],
        reward_functions=[RewardFunctionSpec(f"{__name__}:bench_reward")],
        stage=method,
        estimator=method,
        num_samples=NUM_GENERATIONS,
        kl_in_loss=True,
        kl_estimator="k3",
        init_kl_coef=BETA,
        kl_target=None,
        whiten_advantages=False,
        ppo_epochs=1,
        loss_aggregation="seq_mean_token_mean",
        missing_eos_penalty=None,
        normalize_reward=False,
        sampling=SamplingConfig(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, engine=engine),
        optimizer=lambda params: torch.optim.AdamW(params, lr=LR),
        sample_log_every_n_steps=0,
    )
    dm = PromptDataModule(
        tokenizer=inputs["policy"], train_file=inputs["prompts"], val_fraction=0.0, batch_size=PROMPTS_PER_STEP
    )
    times: list[dict[str, float]] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = trainer.callback_metrics
            step = time.perf_counter() - self.t0
            gen, score = float(m[f"{method}/time_generate"]), float(m[f"{method}/time_score"])
            times.append({"step": step, "generate": gen, "score": score, "rest": step - gen - score})

    L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[Timer()],
    ).fit(module, datamodule=dm)
    return summarise(times, warmup)


def run_trl(method: str, inputs: dict[str, str], warmup: int, steps: int) -> dict[str, float]:
    import datasets
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    tok = AutoTokenizer.from_pretrained(inputs["policy"])
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(inputs["policy"])
    clock = {"generate": 0.0, "score": 0.0}

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                clock[key] += time.perf_counter() - t0

        return wrapper

    type(model).generate = timed(type(model).generate, "generate")
    reward = timed(bench_reward, "score")
    reward.__name__ = "bench_reward"
    prompts = [json.loads(line)["prompt"] for line in Path(inputs["prompts"]).read_text().splitlines()]
    data = datasets.Dataset.from_list([{"prompt": p} for p in prompts])
    common = dict(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=PROMPTS_PER_STEP * NUM_GENERATIONS,
        gradient_accumulation_steps=1,
        num_generations=NUM_GENERATIONS,
        max_completion_length=NEW_TOKENS,
        generation_kwargs={"min_new_tokens": NEW_TOKENS},
        temperature=1.0,
        top_p=1.0,
        beta=BETA,
        num_iterations=1,
        learning_rate=LR,
        max_steps=warmup + steps,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1000,
        disable_tqdm=True,
        seed=0,
    )
    if method == "grpo":
        config, trainer_cls = trl.GRPOConfig(loss_type="grpo", **common), trl.GRPOTrainer
    else:
        config, trainer_cls = trl.RLOOConfig(**common), trl.RLOOTrainer
    times: list[dict[str, float]] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.update(generate=0.0, score=0.0)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step = time.perf_counter() - self.t0
            gen, score = clock["generate"], clock["score"]
            times.append({"step": step, "generate": gen, "score": score, "rest": step - gen - score})

    trainer_cls(
        model=model, reward_funcs=reward, args=config, train_dataset=data, processing_class=tok, callbacks=[Timer()]
    ).train()
    return summarise(times, warmup)


# ----------------------------------------------------------------------------- driver
def run_variant(python: str, variant: str, inputs: dict[str, str], args) -> dict[str, float]:
    cmd = [python, __file__, "--worker", variant, "--inputs", json.dumps(inputs)]
    cmd += ["--warmup", str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trl-python", default=None, help="python of a virtualenv with trl installed")
    parser.add_argument("--methods", default="grpo,rloo")
    parser.add_argument("--engines", default="hf,auto", help="our sampler engines to time")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--inputs", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:  # one variant in this process
        import torch

        torch.set_num_threads(args.threads)
        side, method, *engine = args.worker.split(":")
        inputs = json.loads(args.inputs)
        if side == "trl":
            result = run_trl(method, inputs, args.warmup, args.steps)
        else:
            result = run_ours(method, inputs, args.warmup, args.steps, engine[0])
        print(json.dumps(result))
        return

    methods = args.methods.split(",")
    variants = [(sys.executable, f"ours:{m}:{e}") for m in methods for e in args.engines.split(",")]
    if args.trl_python:
        variants += [(args.trl_python, f"trl:{m}") for m in methods]
    results: dict[str, list[dict[str, float]]] = {v: [] for _, v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = build_inputs(Path(tmp))
        for r in range(args.rounds):
            for python, variant in variants:
                results[variant].append(run_variant(python, variant, inputs, args))
                print(f"round {r}: {variant:16s} {results[variant][-1]['samples_per_s']:.2f} samples/s", flush=True)
    summary = {v: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for v, rs in results.items()}
    header = ("variant", "samples/s", "step s", "generate", "score", "rest", "vs TRL")
    print("\n{:16s} {:>9s} {:>7s} {:>8s} {:>6s} {:>6s} {:>6s}".format(*header))
    # The ratio is the median over rounds of the ratio within a round (paired: machine drift
    # between rounds cancels), not the ratio of the medians.
    ratios = {}
    for variant in summary:
        peer = results.get(f"trl:{variant.split(':')[1]}")
        if peer:
            per_round = [a["samples_per_s"] / b["samples_per_s"] for a, b in zip(results[variant], peer, strict=True)]
            ratios[variant] = statistics.median(per_round)
    for variant, s in summary.items():
        ratio = f"{ratios[variant]:.2f}x" if variant in ratios else "-"
        print(
            f"{variant:16s} {s['samples_per_s']:9.2f} {s['step']:7.3f} {s['generate']:8.3f} "
            f"{s['score']:6.3f} {s['rest']:6.3f} {ratio:>6s}"
        )
    if args.out:
        record = {"args": vars(args), "summary": summary, "ratio_to_trl": ratios, "rounds": results}
        Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
