"""The sweep's frontier report on a synthetic sweep directory: tables by hand, fits, figures, missing points."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rlhf_lightning.eval.frontier import bon_kl, rl_form
from rlhf_lightning.report.frontier import (
    dominance,
    fit_points,
    kl_bin_edges,
    read_points,
    summarize_settings,
    write_frontier_report,
)

SFT_GOLD = 0.1


def _eval(stage: str, gold: float, kl: float, proxy: float) -> dict:
    return {
        "policies": {
            stage: {
                "gold_reward_mean": gold,
                "gold_reward_std": 0.5,
                "kl_to_ref": kl,
                "proxy_reward_mean": proxy,
                "n_samples": 16,
            }
        },
        "settings": {"seed": 0},
    }


def _write(path: Path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


def _point(method: str, label: str, seed: int) -> dict:
    key = label.split("=")[0]
    return {
        "name": f"{method}/{label}/seed{seed}",
        "method": method,
        "stage": method,
        "setting": {f"model.init_args.{key}": float(label.split("=")[1])},
        "setting_label": label,
        "seed": seed,
        "dir": f"points/{method}/{label}/seed{seed}",
    }


# (method, label, seed) -> (gold, kl, proxy)
RESULTS = {
    ("ppo", "init_kl_coef=0.1", 0): (0.50, 4.0, 1.0),
    ("ppo", "init_kl_coef=0.1", 1): (0.70, 6.0, 1.4),
    ("ppo", "init_kl_coef=0.5", 0): (0.40, 1.0, 0.6),
    ("ppo", "init_kl_coef=0.5", 1): (0.30, 1.5, 0.5),
    ("dpo", "beta=0.1", 0): (0.35, 2.5, 0.7),
    ("dpo", "beta=0.3", 0): (0.25, 0.8, 0.4),
}
MISSING = [("dpo", "beta=0.1", 1)]


@pytest.fixture()
def sweep_dir(tmp_path: Path) -> Path:
    points = [_point(m, label, s) for (m, label, s) in [*RESULTS, *MISSING]]
    _write(tmp_path / "points.json", points)
    for (m, label, s), (gold, kl, proxy) in RESULTS.items():
        _write(tmp_path / f"points/{m}/{label}/seed{s}/eval.json", _eval(m, gold, kl, proxy))
    # Training-time evaluations of ppo's low-penalty setting, seed 0 (what eval_trajectory reads).
    csv_path = tmp_path / "points/ppo/init_kl_coef=0.1/seed0/ppo/logs/version_0/metrics.csv"
    csv_path.parent.mkdir(parents=True)
    rows = ["step,eval/kl,eval/gold_reward,eval/proxy_reward,ppo/kl"]
    rows += [f"{s},{kl},{g},{p}," for s, kl, g, p in ((0, 0.0, 0.1, 0.0), (10, 2.0, 0.5, 0.8), (20, 4.0, 0.45, 1.2))]
    rows += ["5,,,,0.3"]
    csv_path.write_text("\n".join(rows) + "\n")
    _write(tmp_path / "base/eval.json", _eval("sft", SFT_GOLD, 0.0, 0.0))
    bon = [
        {
            "n": n,
            "kl": bon_kl(n),
            "d": math.sqrt(bon_kl(n)),
            "gold_mean": SFT_GOLD + 0.3 * math.sqrt(bon_kl(n)) - 0.1 * bon_kl(n),
            "gold_se": 0.01,
            "proxy_mean": 0.1 * n,
            "proxy_se": 0.01,
            "n_prompts": 8,
        }
        for n in (1, 2, 4, 8, 16)
    ]
    _write(tmp_path / "best_of_n.json", {"points": bon, "settings": {}})
    return tmp_path


def test_summarize_settings_means_and_standard_errors(sweep_dir):
    points, missing = read_points(sweep_dir)
    assert len(points) == 6 and missing == [("dpo/beta=0.1/seed1", "no points/dpo/beta=0.1/seed1/eval.json")]
    groups = {(g.method, g.setting_label): g for g in summarize_settings(points)}
    ppo = groups[("ppo", "init_kl_coef=0.1")]
    # gold 0.5, 0.7: mean 0.6, sample std 0.1414, s.e. 0.1; kl 4, 6: mean 5, s.e. 1
    assert ppo.seeds == (0, 1) and ppo.gold == pytest.approx((0.6, 0.1)) and ppo.kl == pytest.approx((5.0, 1.0))
    assert ppo.proxy == pytest.approx(1.2)
    one = groups[("dpo", "beta=0.1")]
    assert one.gold[0] == 0.35 and math.isnan(one.gold[1])  # one seed: no s.e.
    # Sorted by method, then KL.
    assert [(g.method, g.setting_label) for g in summarize_settings(points)] == [
        ("dpo", "beta=0.3"),
        ("dpo", "beta=0.1"),
        ("ppo", "init_kl_coef=0.5"),
        ("ppo", "init_kl_coef=0.1"),
    ]


def test_fit_points_recovers_a_planted_curve():
    from rlhf_lightning.report.frontier import SweepPoint

    kls = [0.5, 1.0, 2.0, 4.0, 9.0]
    pts = [
        SweepPoint(
            f"ppo/{k}", "ppo", "ppo", f"k={k}", 0, Path("."), SFT_GOLD + float(rl_form(math.sqrt(k), 0.4, 0.2)), k, None
        )
        for k in kls
    ]
    data, fits = fit_points(pts, SFT_GOLD, [])
    (fit,) = fits
    assert (fit.method, fit.form, fit.n_points) == ("ppo", "RL", 5)
    assert (fit.alpha, fit.beta, fit.rmse) == pytest.approx((0.4, 0.2, 0.0), abs=1e-9)
    assert fit.peak_kl == pytest.approx(math.exp(0.4 / 0.2 - 1) ** 2)  # d* = exp(alpha/beta - 1)
    assert data["ppo"][0] == pytest.approx([math.sqrt(k) for k in kls])
    _, (lonely,) = fit_points(pts[:1], SFT_GOLD, [])
    assert lonely.alpha is None and lonely.error == "fewer than 2 points"


def test_dominance_by_hand():
    edges = kl_bin_edges(3.0)
    assert edges == [0.0, 0.5, 1.0, 2.0, 4.0]
    cands = [
        ("sft", 0.0, 0.1),
        ("best-of-n", 0.19, 0.2),
        ("dpo", 0.8, 0.25),
        ("ppo", 1.2, 0.4),
        ("dpo", 1.5, 0.5),
        ("ppo", -0.01, 0.15),
    ]
    # [0, .5): sft .1, bon .2, ppo .15 (KL -0.01 counts as 0) -> bon; [.5, 1): dpo;
    # [1, 2): dpo .5 > ppo .4; [2, 4): nothing, no entry
    assert dominance(cands, edges) == [(0.0, 0.5, "best-of-n", 0.2), (0.5, 1.0, "dpo", 0.25), (1.0, 2.0, "dpo", 0.5)]


def test_write_frontier_report(sweep_dir):
    path = write_frontier_report(sweep_dir)
    text = path.read_text()
    assert path == sweep_dir / "frontier.md"
    # Settings table rows: mean ± s.e. over seeds (hand values in the test above), proxy mean.
    assert "| ppo | init_kl_coef=0.1 | 0, 1 | 0.600 ± 0.100 | 5.000 ± 1.000 | 1.200 |" in text
    # gold .4, .3: mean .35, s.e. .05; kl 1, 1.5: mean 1.25, s.e. .25; proxy .55
    assert "| ppo | init_kl_coef=0.5 | 0, 1 | 0.350 ± 0.050 | 1.250 ± 0.250 | 0.550 |" in text
    assert "| dpo | beta=0.1 | 0 | 0.350 ± – | 2.500 ± – | 0.700 |" in text
    assert (
        text.index("| dpo | beta=0.3 |") < text.index("| dpo | beta=0.1 |") < text.index("| ppo | init_kl_coef=0.5 |")
    )
    # SFT gold 0.1 with s.e. 0.5 / sqrt(16) = 0.125.
    assert "gold reward 0.100 ± 0.125" in text and "6 of 7 points finished" in text
    # Fits table: best-of-n recovers the planted alpha 0.3, beta 0.1 from its 5 points; RL rows for both methods.
    assert "| dpo | RL |" in text and "| ppo | RL |" in text
    # Peak: d* = 0.3 / 0.2 = 1.5, KL 2.25, beyond the largest best-of-n KL fitted (1.84).
    assert "| best-of-n | best-of-n | 0.3000 | 0.1000 | 5 | 0.0000 | 2.25 (beyond" in text
    assert "| n | KL (nats) |" in text and f"| 16 | {bon_kl(16):.3f} |" in text
    assert "Which method dominates where" in text and "**ppo** (0.600)" in text  # KL [4, 8): ppo's 5.0
    assert "## Missing points (1)" in text and "`dpo/beta=0.1/seed1`" in text
    for name in ("frontier_gold_vs_kl.png", "frontier_gold_vs_sqrt_kl.png", "frontier_overoptimization.png"):
        assert (sweep_dir / "figures" / name).stat().st_size > 1000
        assert f"(figures/{name})" in text


def test_write_frontier_report_with_nothing_finished(tmp_path):
    _write(tmp_path / "points.json", [_point("ppo", "init_kl_coef=0.1", 0)])
    text = write_frontier_report(tmp_path).read_text()
    assert "0 of 1 points finished" in text and "`ppo/init_kl_coef=0.1/seed0`" in text
    assert "No fits." in text and not (tmp_path / "figures").exists()


def test_over_optimisation_shows_one_seed_per_setting(sweep_dir):
    from rlhf_lightning.report.frontier import _trajectories

    # A second seed of the same setting also logged a trajectory: only the lowest seed is drawn.
    src = sweep_dir / "points/ppo/init_kl_coef=0.1/seed0/ppo/logs/version_0/metrics.csv"
    dst = sweep_dir / "points/ppo/init_kl_coef=0.1/seed1/ppo/logs/version_0/metrics.csv"
    dst.parent.mkdir(parents=True)
    dst.write_text(src.read_text())
    points, _ = read_points(sweep_dir)
    trajectories = _trajectories(points)
    assert [label for label, _ in trajectories["ppo"]] == ["init_kl_coef=0.1 (seed 0)"]
    assert trajectories["ppo"][0][1]["gold"] == [(0.0, 0.1), (2.0, 0.5), (4.0, 0.45)]
