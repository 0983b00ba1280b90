"""The Constitutional-AI numbers of a `configs/cai.yaml` run: held-out gold reward (mean ± standard
error) and KL to SFT per policy, paired differences SL-CAI − SFT and RL-CAI − SL-CAI on the same
prompts, and the SL-CAI / AI-feedback statistics.

    python scripts/cai_summary.py runs/cai
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path


def mean_se(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    var = sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1)
    return m, math.sqrt(var / len(xs))


def main(run_dir: str) -> None:
    root = Path(run_dir)
    rows = [json.loads(line) for line in (root / "eval_samples.jsonl").read_text().splitlines()]
    gold: dict[str, dict[str, float]] = defaultdict(dict)
    kl: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        gold[r["policy"]][r["prompt"]] = r["gold"]
        if r.get("kl") is not None:
            kl[r["policy"]].append(r["kl"])
    print("policy          gold (± s.e.)      KL to SFT")
    for name, by_prompt in gold.items():
        m, se = mean_se(list(by_prompt.values()))
        k = sum(kl[name]) / len(kl[name]) if kl[name] else float("nan")
        print(f"{name:<14} {m:7.3f} ± {se:.3f}     {k:6.2f}")
    for a, b in (("sl_cai", "sft"), ("rl_cai", "sl_cai"), ("rl_cai_grpo", "sl_cai"), ("rl_cai", "sft")):
        if a in gold and b in gold:
            common = sorted(set(gold[a]) & set(gold[b]))
            m, se = mean_se([gold[a][p] - gold[b][p] for p in common])
            print(f"{a} - {b}: {m:+.3f} ± {se:.3f} (paired over {len(common)} prompts; {m / se:+.1f} s.e.)")
    for stage in ("cai_revise", "cai_label"):
        path = root / stage / "stats.json"
        if path.exists():
            stats = {k: v for k, v in json.loads(path.read_text()).items() if k != "settings"}
            print(f"{stage}: {json.dumps(stats)}")
    state = root / "pipeline_state.json"
    if state.exists():
        stages = json.loads(state.read_text())["stages"]
        total = sum(s["seconds"] for s in stages.values())
        print("stage seconds:", {k: v["seconds"] for k, v in stages.items()}, f"total {total:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/cai")
