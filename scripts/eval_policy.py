"""Sample a policy export on held-out prompts: gold reward, EOS rate, length, KL to a reference.

  python scripts/eval_policy.py runs/demo/dpo/hf --ref runs/demo/sft/hf

KL is the Monte-Carlo estimate over the sampled responses y ~ pi:
mean over prompts of sum_t [log pi(y_t) - log pi_ref(y_t)] (log-probs at the sampling
temperature). A stop-gap until the evaluation module replaces it.
"""

from __future__ import annotations

import argparse
import json

import torch

from rlhf_lightning.callbacks import load_callable
from rlhf_lightning.generation import SamplingConfig, decode_responses, sample_responses
from rlhf_lightning.logprobs import token_logprobs
from rlhf_lightning.models import causal_lm_logits, load_causal_lm, load_tokenizer


@torch.no_grad()
def response_logps(model, prompt_ids, prompt_mask, gen, temperature: float) -> torch.Tensor:
    """``(B,)`` summed log-probs of the sampled responses under ``model``."""
    ids = torch.cat([prompt_ids, gen.response_ids], dim=1)  # (B, Q+A)
    mask = torch.cat([prompt_mask, gen.response_mask], dim=1)  # (B, Q+A)
    logits = causal_lm_logits(model, ids, mask)[:, prompt_ids.shape[1] - 1 : -1]  # (B, A, V)
    return (token_logprobs(logits, gen.response_ids, temperature) * gen.response_mask).sum(-1)


def evaluate(args) -> dict[str, float]:
    tok = load_tokenizer(args.policy, padding_side="left")
    policy = load_causal_lm(args.policy, tok).eval()
    ref = load_causal_lm(args.ref, tok).eval() if args.ref else None
    gold = load_callable(args.gold)
    prompts = [json.loads(line)["prompt"] for line in open(args.prompts)][: args.n]
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    torch.manual_seed(args.seed)
    rows = {"gold": [], "eos": [], "len": [], "kl": []}
    samples = []
    for i in range(0, len(prompts), args.batch_size):
        chunk = prompts[i : i + args.batch_size]
        b = tok(chunk, return_tensors="pt", padding=True)
        gen = sample_responses(policy, b.input_ids, b.attention_mask, tok.eos_token_id, tok.pad_token_id, cfg)
        texts = decode_responses(tok, gen)
        rows["gold"] += [float(gold(p, t)) for p, t in zip(chunk, texts)]
        rows["eos"] += gen.ended.float().tolist()
        rows["len"] += gen.lengths.float().tolist()
        if ref is not None:
            kl = response_logps(policy, b.input_ids, b.attention_mask, gen, cfg.temperature) - response_logps(
                ref, b.input_ids, b.attention_mask, gen, cfg.temperature
            )
            rows["kl"] += kl.tolist()
        samples += texts
    out = {k: sum(v) / len(v) for k, v in rows.items() if v}
    print(json.dumps({"policy": args.policy, "ref": args.ref, "n": len(prompts), "gold_reward": out["gold"],
                      "eos_rate": out["eos"], "response_length": out["len"], "kl": out.get("kl")}))
    for t in samples[: args.show]:
        print("  ", repr(t))
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("policy", help="policy export (save_pretrained directory)")
    ap.add_argument("--ref", help="reference export for the KL (e.g. runs/demo/sft/hf)")
    ap.add_argument("--prompts", default="data/demo/prompts_heldout.jsonl")
    ap.add_argument("--gold", default="rlhf_lightning.data.demo:gold_reward")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--show", type=int, default=5, help="print this many responses")
    return evaluate(ap.parse_args(argv))


if __name__ == "__main__":
    main()
