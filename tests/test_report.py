"""The run report: markdown, figures, terminal summary, and stages discovered from the run directory."""

from __future__ import annotations

import csv
import json

from rlhf_lightning.report import (
    discover_stages,
    read_metrics_csv,
    summary_lines,
    write_report,
)
from rlhf_lightning.report.__main__ import main as report_main
from rlhf_lightning.report.figures import panels_for

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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
    _write_csv(
        run / "sft/logs/metrics.csv",
        [{"step": s, "sft/loss": 3 - s / 10} for s in range(5)] + [{"step": 4, "val/sft/loss": 2.7, "epoch": 0}],
    )
    _write_csv(
        run / "reward/logs/metrics.csv",
        [{"step": s, "rm/accuracy": 0.5 + s / 20} for s in range(5)] + [{"step": 4, "val/rm/accuracy": 0.7}],
    )
    _write_csv(
        run / "dpo/logs/metrics.csv",
        [
            {
                "step": s,
                "dpo/loss": 0.69 - s / 50,
                "dpo/chosen_logp": -20 - s,
                "dpo/rejected_logp": -20 - 2 * s,
                "dpo/reward_margin": s / 10,
            }
            for s in range(5)
        ],
    )
    # PPO: train rows and eval rows on separate lines, as Lightning writes them; gold peaks, proxy keeps rising.
    _write_csv(
        run / "ppo/logs/metrics.csv",
        [
            {"step": s, "ppo/reward_score": s / 4, "ppo/kl": s / 2, "ppo/kl_coef": 0.05, "ppo/entropy": 2 - s / 10}
            for s in range(6)
        ]
        + [
            {
                "step": s,
                "eval/kl": s * 1.0,
                "eval/proxy_reward": s / 3,
                "eval/gold_reward": s * (4 - s) / 8,
                "eval/eos_rate": 1.0,
            }
            for s in range(0, 6, 2)
        ],
    )
    (run / "data").mkdir()
    (run / "data/summary.json").write_text(json.dumps({"preference_ceiling_val": 0.84}))
    (run / "pipeline_state.json").write_text(json.dumps({"stages": {"sft": {"seconds": 60.0}, "ppo": {"seconds": 90}}}))
    policies = {
        "sft": {
            "gold_reward_mean": 0.0,
            "gold_reward_std": 0.5,
            "proxy_reward_mean": 0.0,
            "kl_to_ref": 0.0,
            "win_rate_vs_sft_gold": 0.5,
            "eos_rate": 1.0,
            "response_length_mean": 20.0,
            "n_samples": 4,
        },
        "ppo": {
            "gold_reward_mean": 0.4,
            "gold_reward_std": 0.3,
            "proxy_reward_mean": 1.2,
            "kl_to_ref": 3.0,
            "win_rate_vs_sft_gold": 0.7,
            "eos_rate": 0.9,
            "response_length_mean": 25.0,
            "n_samples": 4,
        },
        "dpo": {"gold_reward_mean": 0.5, "gold_reward_std": 0.3, "kl_to_ref": 2.0, "n_samples": 4},
    }
    (run / "eval.json").write_text(json.dumps({"policies": policies, "settings": {"baseline": "sft", "n_prompts": 4}}))
    with (run / "eval_samples.jsonl").open("w") as f:
        for name in policies:
            for i in range(2):
                f.write(
                    json.dumps(
                        {
                            "policy": name,
                            "index": i,
                            "prompt": f"prompt {i}",
                            "response": f"{name} | {i}",
                            "gold": 0.1,
                            "proxy": None,
                            "kl": 0.0,
                        }
                    )
                    + "\n"
                )

    md_path = write_report(run)
    md = md_path.read_text()
    assert md_path == run / "report.md"
    for name in policies:
        assert f"**{name}**" in md and f"{name} \\| 0" in md  # table row; sample with its pipe escaped
    assert "0.840" in md and "0.700" in md  # ceiling and final validation accuracy
    assert "150.0" in md  # total wall time
    figures = sorted((run / "figures").glob("*.png"))
    names = {p.name for p in figures}
    assert {
        "frontier.png",
        "ppo_gold_proxy_vs_kl.png",
        "reward_rm_accuracy.png",
        "sft_curves.png",
        "reward_curves.png",
        "dpo_curves.png",
        "ppo_curves.png",
    } <= names
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
    # The ceiling is the demo pairs' noise: a reward model validated on other pairs (AI feedback)
    # is shown without it; one whose config names the demo pairs keeps it.
    (run / "reward/config.yaml").write_text("inputs: {preference_val_file: elsewhere/preferences_val.jsonl}\n")
    assert summary_lines(run)[4] == "reward model: validation accuracy 0.700"
    demo_pairs = run / "data" / "preferences_val.jsonl"
    (run / "reward/config.yaml").write_text(f"inputs: {{preference_val_file: {demo_pairs}}}\n")
    assert summary_lines(run)[4].endswith("(label-noise ceiling 0.840)")


def test_report_skips_what_is_missing(tmp_path):
    _write_csv(tmp_path / "sft/logs/metrics.csv", [{"step": 0, "unrelated": 1.0}])
    md = write_report(tmp_path, stages={"sft": "sft", "ppo": "ppo"}).read_text()
    assert md.startswith("# RLHF run report") and "Nothing to report" in md


def test_new_stages_are_discovered_without_code_changes(tmp_path):
    run = tmp_path / "run"
    # A GRPO stage shares PPO's metric names under its own prefix; an RLOO stage sits outside run_dir.
    _write_csv(
        run / "grpo/logs/metrics.csv",
        [{"step": s, "grpo/reward_score": s / 4, "grpo/kl": s / 2, "grpo/iteration": s} for s in range(4)]
        + [{"step": s, "eval/kl": s * 1.0, "eval/gold_reward": s / 8} for s in (0, 2)],
    )
    _write_csv(tmp_path / "elsewhere/rloo/logs/version_0/metrics.csv", [{"step": 0, "rloo/kl": 0.1}])
    _write_csv(run / "sft/logs/metrics.csv", [{"step": 0, "sft/loss": 3.0}])
    (run / "pipeline_state.json").write_text(json.dumps({"stages": {"data": {}, "sft": {}, "grpo": {}}}))
    policies = {
        "grpo": {"gold_reward_mean": 0.2, "kl_to_ref": 1.0, "n_samples": 2},
        "rloo": {"gold_reward_mean": 0.1, "kl_to_ref": 0.5, "n_samples": 2},
    }
    settings = {"policies": {"grpo": str(run / "grpo/hf"), "rloo": str(tmp_path / "elsewhere/rloo/hf")}}
    (run / "eval.json").write_text(json.dumps({"policies": policies, "settings": settings}))

    found = discover_stages(run, json.loads((run / "eval.json").read_text()))
    # Pipeline order first, then the evaluated policies (an export's parent directory too); data has no metrics.
    assert list(found) == ["sft", "grpo", "rloo"] and found["rloo"] == tmp_path / "elsewhere/rloo"
    titles = [t for t, _ in panels_for(read_metrics_csv(run / "grpo/logs/metrics.csv"))]
    assert "GRPO reward score" in titles and "GRPO KL" in titles and "PPO KL" in titles

    md = write_report(run).read_text()
    for name in ("grpo_curves.png", "rloo_curves.png", "grpo_gold_proxy_vs_kl.png", "frontier.png"):
        assert (run / "figures" / name).is_file() and f"](figures/{name})" in md, name
    assert "along grpo" in md and "### rloo" in md


def test_report_module_entry_point(tmp_path, capsys):
    _write_csv(tmp_path / "sft/logs/metrics.csv", [{"step": s, "sft/loss": 3 - s} for s in range(3)])
    assert report_main([str(tmp_path)]) == tmp_path / "report.md"
    assert str(tmp_path / "report.md") in capsys.readouterr().out
    assert (tmp_path / "figures/sft_curves.png").is_file()
