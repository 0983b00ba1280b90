"""Frontier maths by hand and against brute force; best-of-n end to end on a tiny export."""

from __future__ import annotations

import itertools
import json
import math
import random

import numpy as np
import pytest

from rlhf_lightning.cli import COMMANDS
from rlhf_lightning.eval.best_of_n import best_of_n, best_of_n_points
from rlhf_lightning.eval.best_of_n import main as best_of_n_main
from rlhf_lightning.eval.frontier import (
    best_of_n_estimate,
    best_of_n_weights,
    bon_form,
    bon_kl,
    fit_bon,
    fit_rl,
    fit_rmse,
    mean_se,
    peak_d,
    rl_form,
)
from rlhf_lightning.generation import SamplingConfig

DEMO_GOLD = "rlhf_lightning.data.demo:gold_reward"

# ----------------------------------------------------------------------------- best-of-n


def test_bon_kl_by_hand():
    assert bon_kl(1) == 0.0
    assert bon_kl(2) == pytest.approx(math.log(2) - 0.5)  # 0.1931
    assert bon_kl(64) == pytest.approx(math.log(64) - 63 / 64)  # 3.1748
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            bon_kl(bad)


def test_best_of_n_weights_by_hand():
    # N = 4, n = 2: C(4, 2) = 6 subsets; rank i (1-based) is the max of C(i-1, 1) = i-1 of them.
    assert best_of_n_weights(4, 2) == pytest.approx([0, 1 / 6, 2 / 6, 3 / 6])
    assert best_of_n_weights(4, 1) == pytest.approx([0.25] * 4)
    assert best_of_n_weights(4, 4) == [0, 0, 0, 1.0]
    assert sum(best_of_n_weights(200, 17)) == pytest.approx(1.0)  # hockey stick, big integers exact
    with pytest.raises(ValueError):
        best_of_n_weights(3, 4)


def test_best_of_n_estimate_hand_case():
    proxy = [0.3, 0.1, 0.9, 0.5]
    gold = [1.0, 2.0, 3.0, 4.0]
    # Ascending proxy: 0.1 (gold 2), 0.3 (gold 1), 0.5 (gold 4), 0.9 (gold 3).
    # n = 2, weights 0, 1/6, 2/6, 3/6: gold = (1 + 2*4 + 3*3) / 6 = 18/6 = 3; proxy = (0.3 + 1.0 + 2.7) / 6 = 4/6
    assert best_of_n_estimate(proxy, gold, 2) == pytest.approx((3.0, 4 / 6))
    assert best_of_n_estimate(proxy, gold, 1) == pytest.approx((2.5, 0.45))  # plain means
    assert best_of_n_estimate(proxy, gold, 4) == pytest.approx((3.0, 0.9))  # the proxy's favourite


def test_best_of_n_estimate_ties_later_sample_wins():
    # Equal proxies: of samples 0 and 1 the later (gold 5) ranks higher, so best-of-2 of these two is it.
    assert best_of_n_estimate([1.0, 1.0], [-5.0, 5.0], 2) == (5.0, 1.0)
    assert best_of_n_estimate([1.0, 1.0], [5.0, -5.0], 2) == (-5.0, 1.0)


def _brute_force(proxy, gold, n):
    """Mean over every n-subset of the (gold, proxy) of its max by (proxy, position)."""
    picks = [max(s, key=lambda i: (proxy[i], i)) for s in itertools.combinations(range(len(proxy)), n)]
    return sum(gold[i] for i in picks) / len(picks), sum(proxy[i] for i in picks) / len(picks)


@pytest.mark.parametrize("n_samples", [1, 3, 6, 8])
def test_best_of_n_estimate_matches_enumeration_of_subsets(n_samples):
    rng = random.Random(n_samples)
    for _ in range(5):
        proxy = [rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(n_samples)]  # ties included
        gold = [rng.gauss(0, 1) for _ in range(n_samples)]
        for n in range(1, n_samples + 1):
            assert best_of_n_estimate(proxy, gold, n) == pytest.approx(_brute_force(proxy, gold, n), abs=1e-12)


def test_best_of_n_points_by_hand():
    # Two prompts of 2 samples; best-of-2 gold per prompt: 4 (proxy 0.9) and 1 (proxy 0.2).
    records = [
        {"index": 0, "proxy": 0.1, "gold": 2.0},
        {"index": 0, "proxy": 0.9, "gold": 4.0},
        {"index": 1, "proxy": 0.2, "gold": 1.0},
        {"index": 1, "proxy": 0.0, "gold": 3.0},
    ]
    p1, p2 = best_of_n_points(records, [2, 1])
    # n = 1: per-prompt means 3 and 2 -> mean 2.5, sample std 0.7071, s.e. 0.5
    assert (p1["n"], p1["kl"], p1["d"]) == (1, 0.0, 0.0)
    assert (p1["gold_mean"], p1["gold_se"], p1["n_prompts"]) == pytest.approx((2.5, 0.5, 2))
    # n = 2: 4 and 1 -> mean 2.5, s.e. = 2.1213 / sqrt 2 = 1.5; proxy (0.9 + 0.2) / 2
    assert (p2["gold_mean"], p2["gold_se"], p2["proxy_mean"]) == pytest.approx((2.5, 1.5, 0.55))
    assert p2["d"] == pytest.approx(math.sqrt(bon_kl(2)))
    assert best_of_n_points(records[:2], [1])[0]["gold_se"] is None  # one prompt: no s.e.


# ----------------------------------------------------------------------------- Gao et al.'s forms


def test_forms_by_hand():
    # d = 2: bon 2 (3 - 0.5 * 2) = 4; rl 2 (3 - 0.5 ln 2) = 6 - ln 2
    assert bon_form(2.0, 3.0, 0.5) == pytest.approx(4.0)
    assert rl_form(2.0, 3.0, 0.5) == pytest.approx(6 - math.log(2))
    assert rl_form([0.0], 3.0, 0.5)[0] == 0.0  # the limit at d = 0, no nan
    assert peak_d(bon_form, 3.0, 0.5) == pytest.approx(3.0)  # alpha / (2 beta)
    assert peak_d(rl_form, 1.0, 0.5) == pytest.approx(math.e)  # exp(alpha / beta - 1)
    assert peak_d(rl_form, 1.0, -0.5) is None


@pytest.mark.parametrize(("fit", "form"), [(fit_bon, bon_form), (fit_rl, rl_form)])
def test_fits_recover_parameters(fit, form):
    d = np.array([0.0, 0.3, 0.7, 1.0, 1.5, 2.2, 3.0])
    alpha, beta = 0.8, 0.25
    r = form(d, alpha, beta)
    assert fit(d, r) == pytest.approx((alpha, beta), abs=1e-10)  # exact points: exact fit
    assert fit_rmse(d, r, form, alpha, beta) == pytest.approx(0.0, abs=1e-12)
    rng = np.random.default_rng(0)
    dd = np.linspace(0.1, 3.0, 400)
    noisy = form(dd, alpha, beta) + rng.normal(0, 0.02, dd.shape)
    a, b = fit(dd, noisy)
    assert a == pytest.approx(alpha, abs=0.02) and b == pytest.approx(beta, abs=0.02)
    assert fit_rmse(dd, noisy, form, a, b) == pytest.approx(0.02, rel=0.15)


def test_fit_two_points_by_hand():
    # bon: r = a d - b d^2 through (1, 1) and (2, 0): a - b = 1, 2a - 4b = 0 -> a = 2, b = 1
    assert fit_bon([1.0, 2.0], [1.0, 0.0]) == pytest.approx((2.0, 1.0))
    # rl: through (1, 0.5) gives a = 0.5; (e, 0) gives e (0.5 - b) = 0 -> b = 0.5
    assert fit_rl([1.0, math.e], [0.5, 0.0]) == pytest.approx((0.5, 0.5))


@pytest.mark.parametrize("fit", [fit_bon, fit_rl])
def test_fits_refuse_too_few_points(fit):
    with pytest.raises(ValueError, match="at least 2 points"):
        fit([1.0], [0.5])
    with pytest.raises(ValueError, match="do not determine"):
        fit([0.0, 1.5, 1.5], [0.0, 0.2, 0.3])  # one distinct d > 0
    with pytest.raises(ValueError, match="one length"):
        fit([1.0, 2.0], [0.5])


def test_mean_se_by_hand():
    # mean 2.5; sample var (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3; s.e. sqrt(5/3 / 4) = 0.6455
    assert mean_se([4, 1, 3, 2]) == pytest.approx((2.5, math.sqrt(5 / 12)))
    m, se = mean_se([7.0])
    assert m == 7.0 and math.isnan(se)
    with pytest.raises(ValueError):
        mean_se([])


# ----------------------------------------------------------------------------- end to end


def test_best_of_n_end_to_end(demo_workspace, tmp_path):
    ws = demo_workspace
    result = best_of_n(
        str(ws / "runs/demo/sft/hf"),
        str(ws / "runs/demo/reward/hf"),
        str(ws / "data/demo/prompts_heldout.jsonl"),
        DEMO_GOLD,
        ns=(1, 2, 4),
        max_prompts=3,
        sampling=SamplingConfig(max_new_tokens=6),
        batch_size=5,  # a prompt's 4 samples span two sampling passes
        out_dir=str(tmp_path),
    )
    points = result["points"]
    assert [p["n"] for p in points] == [1, 2, 4]
    assert [p["kl"] for p in points] == pytest.approx([bon_kl(1), bon_kl(2), bon_kl(4)])
    assert all(p["n_prompts"] == 3 for p in points)
    rows = [json.loads(line) for line in (tmp_path / "best_of_n_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and [(r["index"], r["sample"]) for r in rows[:5]] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    assert len({r["prompt"] for r in rows if r["index"] == 1}) == 1
    # The saved points follow from the saved samples; proxy means rise with n (the proxy picks).
    assert best_of_n_points(rows, [1, 2, 4]) == points
    assert points[0]["proxy_mean"] <= points[1]["proxy_mean"] <= points[2]["proxy_mean"]
    assert points[0]["gold_mean"] == pytest.approx(sum(r["gold"] for r in rows) / 12)
    saved = json.loads((tmp_path / "best_of_n.json").read_text())
    assert saved["points"] == points and saved["settings"]["samples_per_prompt"] == 4


def test_best_of_n_cli(demo_workspace, tmp_path, capsys):
    ws = demo_workspace
    assert COMMANDS["best-of-n"] is best_of_n_main
    args = [
        "--policy",
        str(ws / "runs/demo/sft/hf"),
        "--reward_model",
        str(ws / "runs/demo/reward/hf"),
        "--prompts_file",
        str(ws / "data/demo/prompts_heldout.jsonl"),
        "--gold_reward",
        DEMO_GOLD,
        "--n",
        "1",
        "2",
        "--max_prompts",
        "2",
        "--max_new_tokens",
        "4",
        "--out_dir",
        str(tmp_path),
    ]
    result = COMMANDS["best-of-n"](args)
    assert [p["n"] for p in result["points"]] == [1, 2] and (tmp_path / "best_of_n.json").is_file()
    assert "gold" in capsys.readouterr().out
