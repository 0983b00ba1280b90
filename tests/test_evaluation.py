"""Evaluation metrics by hand, policy comparison end to end on tiny exports, and the markdown report."""

from __future__ import annotations

import csv
import json
import math
import shutil

import pytest

from rlhf_lightning.data.demo import gold_reward
from rlhf_lightning.evaluation import aggregate_metrics, distinct_n, evaluate_policies, summarize, win_rate
from rlhf_lightning.generation import SamplingConfig
from rlhf_lightning.report import read_metrics_csv, summary_lines, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- pure metrics


def test_distinct_n_by_hand():
    texts = ["a b a b", "a c"]
    # unigrams: a b a b | a c -> 6 in all, unique {a, b, c} = 3 -> 3/6
    assert distinct_n(texts, 1) == pytest.approx(0.5)
    # bigrams: (a b) (b a) (a b) | (a c) -> 4 in all, unique {ab, ba, ac} = 3 -> 3/4 (none crosses texts)
    assert distinct_n(texts, 2) == pytest.approx(0.75)
    # trigrams: (a b a) (b a b) | none -> 2/2
    assert distinct_n(texts, 3) == 1.0
    assert distinct_n(["", "one"], 2) == 0.0  # no bigram at all


def test_win_rate_by_hand():
    # prompt 1: 2 > 1 -> 1; prompt 2: 0 == 0 -> 0.5; prompt 3: -1 < 3 -> 0; prompt 4: 5 > 4 -> 1
    # mean = (1 + 0.5 + 0 + 1) / 4 = 0.625
    assert win_rate([2, 0, -1, 5], [1, 0, 3, 4]) == pytest.approx(0.625)
    assert win_rate([1.0, 2.0], [1.0, 2.0]) == 0.5
    with pytest.raises(ValueError):
        win_rate([1.0], [1.0, 2.0])


def test_summarize_by_hand():
    s = summarize([4, 1, 3, 2])
    # mean 2.5; population var = (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25
    assert s["mean"] == pytest.approx(2.5) and s["std"] == pytest.approx(math.sqrt(1.25))
    # sorted 1 2 3 4, linear interpolation at (n-1)q = 3q: q10 -> 1.3, q50 -> 2.5, q90 -> 3.7
    assert (s["q10"], s["q25"], s["q50"], s["q75"], s["q90"]) == pytest.approx((1.3, 1.75, 2.5, 3.25, 3.7))


def _records(policy, responses, kls):
    return [
        {"policy": policy, "index": i, "prompt": f"p{i}", "response": r, "gold": gold_reward(f"p{i}", r),
         "proxy": float(len(r)), "kl": k, "length": len(r.split()) + 1, "ended": True}
        for i, (r, k) in enumerate(zip(responses, kls))
    ]


def test_aggregate_metrics_known_win_rate():
    sft = ["The script was clever.", "The acting was terrible.", "It runs for about two hours.", "The ending was dull."]
    ppo = ["The acting was wonderful.", "The ending was dull.", "It runs for about two hours.",
           "The acting was terrible."]
    # gold (tanh(S/2), no penalty): sft 0.462, -0.762, 0.0, -0.462; ppo 0.762, -0.462, 0.0, -0.762
    # ppo vs sft per prompt: win, win, tie, loss -> (1 + 1 + 0.5 + 0) / 4 = 0.625
    records = _records("ppo", ppo, [1.0, 2.0, 0.0, 3.0]) + _records("sft", sft, [0.0] * 4)
    m = aggregate_metrics(records, baseline="sft")
    assert list(m) == ["ppo", "sft"]  # order of first appearance
    assert m["ppo"]["win_rate_vs_sft_gold"] == pytest.approx(0.625)
    assert m["sft"]["win_rate_vs_sft_gold"] == 0.5 and m["sft"]["win_rate_vs_sft_proxy"] == 0.5
    # proxy = characters: 25 > 22, 20 < 24, 28 == 28, 24 > 20 -> (1 + 0 + 0.5 + 1) / 4 = 0.625
    assert m["ppo"]["win_rate_vs_sft_proxy"] == pytest.approx(0.625)
    t = math.tanh(0.5)  # one +-1 lexicon word: tanh(1/2) = 0.462; one +-2 word: tanh(1) = 0.762
    assert m["ppo"]["gold_reward_mean"] == pytest.approx((math.tanh(1) - t + 0 - math.tanh(1)) / 4)
    assert m["ppo"]["kl_to_ref"] == pytest.approx(1.5)  # (1 + 2 + 0 + 3) / 4
    assert m["ppo"]["n_samples"] == 4 and m["ppo"]["eos_rate"] == 1.0
    assert set(m["ppo"]["gold_reward_quantiles"]) == {"q10", "q25", "q50", "q75", "q90"}
    # Without a baseline among the records: no win rates, the rest unchanged.
    assert not any(k.startswith("win_rate") for k in aggregate_metrics(records, baseline="dpo")["ppo"])


# ----------------------------------------------------------------------------- end to end


def test_evaluate_policies_end_to_end(demo_workspace, tmp_path):
    ws = demo_workspace
    sft = str(ws / "runs/demo/sft/hf")
    copy = shutil.copytree(sft, tmp_path / "copy")  # same weights, another path: loaded separately
    result = evaluate_policies(
        {"sft": sft, "copy": str(copy)}, str(ws / "data/demo/prompts_heldout.jsonl"), reference=sft,
        reward_model=str(ws / "runs/demo/reward/hf"), sampling=SamplingConfig(max_new_tokens=8),
        batch_size=4, max_prompts=6, out_dir=str(tmp_path / "eval"),
    )
    m = result["policies"]
    assert m["sft"]["kl_to_ref"] == 0.0  # the reference itself: exactly 0
    assert abs(m["copy"]["kl_to_ref"]) < 1e-4
    assert m["sft"]["win_rate_vs_sft_gold"] == 0.5 and m["sft"]["win_rate_vs_sft_proxy"] == 0.5
    for name in ("sft", "copy"):
        assert m[name]["n_samples"] == 6
        for key in ("gold_reward_mean", "gold_reward_std", "gold_reward_quantiles", "proxy_reward_mean",
                    "eos_rate", "response_length_mean", "distinct_1", "distinct_2", "win_rate_vs_sft_gold"):
            assert key in m[name], key
    saved = json.loads((tmp_path / "eval/eval.json").read_text())
    assert set(saved) == {"policies", "settings"} and set(saved["policies"]) == {"sft", "copy"}
    assert saved["settings"]["sampling"]["max_new_tokens"] == 8
    rows = [json.loads(line) for line in (tmp_path / "eval/eval_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and {"policy", "prompt", "response", "gold", "proxy", "kl"} <= set(rows[0])
    # Same seed, same weights: the same sample for every prompt.
    by = {(r["policy"], r["index"]): r["response"] for r in rows}
    assert all(by[("sft", i)] == by[("copy", i)] for i in range(6))


def test_evaluate_cli(demo_workspace, tmp_path, capsys):
    ws = demo_workspace
    sft = str(ws / "runs/demo/sft/hf")
    from rlhf_lightning.cli import cli_main

    result = cli_main(["evaluate", "--policy", f"sft={sft}", "--reference", sft, "--prompts",
                       str(ws / "data/demo/prompts_heldout.jsonl"), "--gold_reward", "none", "--max_prompts", "2",
                       "--max_new_tokens", "4", "--out", str(tmp_path)])
    assert "gold_reward_mean" not in result["policies"]["sft"] and (tmp_path / "eval.json").is_file()
    assert "policy" in capsys.readouterr().out


# ----------------------------------------------------------------------------- report


def _write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = sorted({k for r in rows for k in r})
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, columns)
        w.writeheader()
        w.writerows(rows)


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1024, path


def test_write_report(tmp_path):
    run = tmp_path / "run"
    _write_csv(run / "sft/logs/metrics.csv",
               [{"step": s, "sft/loss": 3 - s / 10} for s in range(5)] + [{"step": 4, "val/sft/loss": 2.7, "epoch": 0}])
    _write_csv(run / "reward/logs/metrics.csv",
               [{"step": s, "rm/accuracy": 0.5 + s / 20} for s in range(5)] + [{"step": 4, "val/rm/accuracy": 0.7}])
    _write_csv(run / "dpo/logs/metrics.csv",
               [{"step": s, "dpo/loss": 0.69 - s / 50, "dpo/chosen_logp": -20 - s, "dpo/rejected_logp": -20 - 2 * s,
                 "dpo/reward_margin": s / 10} for s in range(5)])
    # PPO: train rows and eval rows on separate lines, as Lightning writes them; gold peaks, proxy keeps rising.
    _write_csv(run / "ppo/logs/metrics.csv",
               [{"step": s, "ppo/reward_score": s / 4, "ppo/kl": s / 2, "ppo/kl_coef": 0.05, "ppo/entropy": 2 - s / 10}
                for s in range(6)]
               + [{"step": s, "eval/kl": s * 1.0, "eval/proxy_reward": s / 3, "eval/gold_reward": s * (4 - s) / 8,
                   "eval/eos_rate": 1.0} for s in range(0, 6, 2)])
    (run / "data").mkdir()
    (run / "data/summary.json").write_text(json.dumps({"preference_ceiling_val": 0.84}))
    (run / "pipeline_state.json").write_text(json.dumps({"stages": {"sft": {"seconds": 60.0}, "ppo": {"seconds": 90}}}))
    policies = {
        "sft": {"gold_reward_mean": 0.0, "gold_reward_std": 0.5, "proxy_reward_mean": 0.0, "kl_to_ref": 0.0,
                "win_rate_vs_sft_gold": 0.5, "eos_rate": 1.0, "response_length_mean": 20.0, "n_samples": 4},
        "ppo": {"gold_reward_mean": 0.4, "gold_reward_std": 0.3, "proxy_reward_mean": 1.2, "kl_to_ref": 3.0,
                "win_rate_vs_sft_gold": 0.7, "eos_rate": 0.9, "response_length_mean": 25.0, "n_samples": 4},
        "dpo": {"gold_reward_mean": 0.5, "gold_reward_std": 0.3, "kl_to_ref": 2.0, "n_samples": 4},
    }
    (run / "eval.json").write_text(json.dumps({"policies": policies, "settings": {"baseline": "sft", "n_prompts": 4}}))
    with (run / "eval_samples.jsonl").open("w") as f:
        for name in policies:
            for i in range(2):
                f.write(json.dumps({"policy": name, "index": i, "prompt": f"prompt {i}", "response": f"{name} | {i}",
                                    "gold": 0.1, "proxy": None, "kl": 0.0}) + "\n")

    md_path = write_report(run)
    md = md_path.read_text()
    assert md_path == run / "report.md"
    for name in policies:
        assert f"**{name}**" in md and f"{name} \\| 0" in md  # table row; sample with its pipe escaped
    assert "0.840" in md and "0.700" in md  # ceiling and final validation accuracy
    assert "150.0" in md  # total wall time
    figures = sorted((run / "figures").glob("*.png"))
    names = {p.name for p in figures}
    assert {"frontier.png", "ppo_gold_proxy_vs_kl.png", "reward_rm_accuracy.png", "sft_curves.png",
            "reward_curves.png", "dpo_curves.png", "ppo_curves.png"} <= names
    for p in figures:
        _assert_png(p)
        assert f"](figures/{p.name})" in md  # relative links render from run_dir
    # Gold over the eval rows, s(4-s)/8 for s = 0, 2, 4: 0, 0.5, 0 (blank cells of train rows skipped).
    assert read_metrics_csv(run / "ppo/logs/metrics.csv")["eval/gold_reward"] == [(0, 0.0), (2, 0.5), (4, 0.0)]
    # The terminal summary the pipeline prints at the end: one row per policy, "-" where a
    # policy lacks a metric, then the RM accuracy beside its ceiling.
    lines = summary_lines(run)
    assert lines[0].split() == ["policy", "gold", "proxy", "KL", "EOS", "length", "win/sft"]
    assert lines[2].split() == ["ppo", "0.400", "1.200", "3.000", "0.900", "25.000", "0.700"]
    assert lines[3].split() == ["dpo", "0.500", "-", "2.000", "-", "-", "-"]
    assert lines[4] == "reward model: validation accuracy 0.700 (label-noise ceiling 0.840)"


def test_report_skips_what_is_missing(tmp_path):
    _write_csv(tmp_path / "sft/logs/metrics.csv", [{"step": 0, "unrelated": 1.0}])
    md = write_report(tmp_path, stages={"sft": "sft", "ppo": "ppo"}).read_text()
    assert md.startswith("# RLHF run report") and "Nothing to report" in md
