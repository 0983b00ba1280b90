"""``frontier.md``: the reward–KL frontier of a sweep, Gao et al.'s fits, over-optimisation.

``python -m rlhf_lightning.report.frontier SWEEP_DIR`` reads what the sweep runner left
in ``SWEEP_DIR``:

* ``points.json``: a list of ``{"name", "method", "stage", "setting", "setting_label",
  "seed", "dir"}`` (``dir`` relative to ``SWEEP_DIR``);
* ``<dir>/eval.json`` of each point (``rlhf-lightning evaluate`` with one policy named
  after the point's ``stage``); a point without one is unfinished and listed as missing;
* ``<dir>/<stage>/logs/**/metrics.csv`` of each point (``eval/kl``, ``eval/gold_reward``,
  ``eval/proxy_reward`` along training, when the stage logged them);
* ``base/eval.json``: the SFT policy's row ``policies["sft"]`` (KL 0), the reference;
* ``best_of_n.json`` (``rlhf-lightning best-of-n``), optional;

and writes ``SWEEP_DIR/frontier.md`` with PNG figures in ``SWEEP_DIR/figures/``. The
fits use ``d = sqrt(max(KL, 0))`` (a Monte-Carlo KL can come out slightly negative) and
``r`` = gold reward minus the SFT policy's: the base run's for the RL methods, the
best-of-n curve's own ``n = 1`` point (the same samples) for best-of-n.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_lightning.eval.frontier import bon_form, fit_bon, fit_rl, fit_rmse, mean_se, peak_d, rl_form
from rlhf_lightning.report.figures import eval_trajectory
from rlhf_lightning.report.frontier_figures import (
    BON,
    plot_gold_vs_kl,
    plot_gold_vs_sqrt_kl,
    plot_sweep_overoptimization,
)
from rlhf_lightning.report.io import find_metrics_csv, read_json, read_metrics_csv
from rlhf_lightning.report.markdown import _table

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepPoint:
    """One finished point of the sweep: its identity and the evaluated numbers of its policy."""

    name: str
    method: str
    stage: str
    setting_label: str
    seed: int
    dir: Path
    gold: float
    kl: float
    proxy: float | None


@dataclass(frozen=True)
class SettingSummary:
    """A (method, setting) over its seeds: ``(mean, standard error)`` pairs (s.e. nan for one seed)."""

    method: str
    setting_label: str
    seeds: tuple[int, ...]
    gold: tuple[float, float]
    kl: tuple[float, float]
    proxy: float | None


@dataclass(frozen=True)
class MethodFit:
    """Gao et al.'s form fitted to a method's points; ``alpha`` None (and ``error``) when it could not be."""

    method: str
    form: str  # "best-of-n" or "RL"
    n_points: int
    alpha: float | None = None
    beta: float | None = None
    rmse: float | None = None
    peak_kl: float | None = None
    max_kl: float | None = None  # the largest KL among the points fitted
    error: str | None = None


# ----------------------------------------------------------------------------- reading


def read_points(sweep_dir: Path) -> tuple[list[SweepPoint], list[tuple[str, str]]]:
    """``(finished points, [(name, why missing)])`` from ``points.json`` and each point's ``eval.json``."""
    finished, missing = [], []
    for entry in read_json(sweep_dir / "points.json") or []:
        path = sweep_dir / entry["dir"] / "eval.json"
        ev = read_json(path)
        metrics = ((ev or {}).get("policies") or {}).get(entry["stage"])
        if ev is None:
            missing.append((entry["name"], f"no {path.relative_to(sweep_dir)}"))
        elif metrics is None or metrics.get("gold_reward_mean") is None or metrics.get("kl_to_ref") is None:
            missing.append(
                (entry["name"], f"{path.relative_to(sweep_dir)} has no gold reward and KL for {entry['stage']!r}")
            )
        else:
            finished.append(
                SweepPoint(
                    name=entry["name"],
                    method=entry["method"],
                    stage=entry["stage"],
                    setting_label=entry.get("setting_label") or "default",
                    seed=int(entry.get("seed", 0)),
                    dir=sweep_dir / entry["dir"],
                    gold=float(metrics["gold_reward_mean"]),
                    kl=float(metrics["kl_to_ref"]),
                    proxy=metrics.get("proxy_reward_mean"),
                )
            )
    return finished, missing


def summarize_settings(points: list[SweepPoint]) -> list[SettingSummary]:
    """One summary per (method, setting), sorted by method, then mean KL."""
    groups: dict[tuple[str, str], list[SweepPoint]] = defaultdict(list)
    for p in points:
        groups[(p.method, p.setting_label)].append(p)
    out = []
    for (method, label), ps in groups.items():
        proxies = [p.proxy for p in ps if p.proxy is not None]
        out.append(
            SettingSummary(
                method=method,
                setting_label=label,
                seeds=tuple(sorted(p.seed for p in ps)),
                gold=mean_se([p.gold for p in ps]),
                kl=mean_se([p.kl for p in ps]),
                proxy=sum(proxies) / len(proxies) if proxies else None,
            )
        )
    return sorted(out, key=lambda s: (s.method, s.kl[0], s.setting_label))


# ----------------------------------------------------------------------------- fits and dominance


def _fit_row(method: str, form: str, d: list[float], r: list[float]) -> MethodFit:
    fit, shape = (fit_bon, bon_form) if form == "best-of-n" else (fit_rl, rl_form)
    try:
        alpha, beta = fit(d, r)
    except ValueError:
        why = "fewer than 2 points" if len(d) < 2 else "fewer than 2 distinct KL > 0"
        return MethodFit(method, form, len(d), error=why)
    peak = peak_d(shape, alpha, beta)
    rmse = fit_rmse(d, r, shape, alpha, beta)
    return MethodFit(method, form, len(d), alpha, beta, rmse, None if peak is None else peak**2, max(d) ** 2)


def fit_points(
    points: list[SweepPoint], sft_gold: float | None, bon: list[dict[str, Any]]
) -> tuple[dict[str, tuple[list[float], list[float]]], list[MethodFit]]:
    """``({method: (d, r)}, fits)``: each RL method's points (all seeds) fit the RL form; best-of-n its own.

    ``d = sqrt(max(KL, 0))``; ``r`` is relative to ``sft_gold`` (RL methods; none without it)
    and to the best-of-n ``n = 1`` point (best-of-n).
    """
    data: dict[str, tuple[list[float], list[float]]] = {}
    fits = []
    if bon:
        base = next((p["gold_mean"] for p in bon if p["n"] == 1), None)
        if base is not None:
            data[BON] = ([p["d"] for p in bon], [p["gold_mean"] - base for p in bon])
            fits.append(_fit_row(BON, "best-of-n", *data[BON]))
    if sft_gold is not None:
        for method in sorted({p.method for p in points}):
            mine = [p for p in points if p.method == method]
            data[method] = ([math.sqrt(max(p.kl, 0.0)) for p in mine], [p.gold - sft_gold for p in mine])
            fits.append(_fit_row(method, "RL", *data[method]))
    return data, fits


def kl_bin_edges(max_kl: float) -> list[float]:
    """``[0, 0.5, 1, 2, 4, ...]``, doubling until the last edge exceeds ``max_kl``."""
    edges = [0.0, 0.5]
    while edges[-1] <= max_kl:
        edges.append(edges[-1] * 2)
    return edges


def dominance(candidates: list[tuple[str, float, float]], edges: list[float]) -> list[tuple[float, float, str, float]]:
    """For each KL bin ``[lo, hi)`` with candidates, ``(lo, hi, method, gold)`` of the highest gold.

    Args:
        candidates: ``(method, kl, gold)``, one per setting (means over seeds); a negative
            KL counts as 0. Equal gold: the first candidate given wins.
    """
    out = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = [c for c in candidates if lo <= max(c[1], 0.0) < hi]
        if inside:
            best = max(inside, key=lambda c: c[2])  # max keeps the first of equals
            out.append((lo, hi, best[0], best[2]))
    return out


# ----------------------------------------------------------------------------- markdown


def _pm(mean: float, se: float | None) -> str:
    return f"{mean:.3f} ± " + ("–" if se is None or math.isnan(se) else f"{se:.3f}")


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "–" if x is None else format(x, fmt)


def _trajectories(points: list[SweepPoint]) -> dict[str, list[tuple[str, dict]]]:
    """``{method: [(setting label, eval_trajectory)]}`` of each setting's lowest seed that logged one."""
    out: dict[str, list[tuple[str, dict]]] = defaultdict(list)
    shown: set[tuple[str, str]] = set()
    for p in sorted(points, key=lambda p: (p.method, p.setting_label, p.seed)):
        if (p.method, p.setting_label) in shown:
            continue
        csv_path = find_metrics_csv(p.dir / p.stage)
        traj = eval_trajectory(read_metrics_csv(csv_path)) if csv_path else {}
        if traj:
            shown.add((p.method, p.setting_label))
            out[p.method].append((f"{p.setting_label} (seed {p.seed})", traj))
    return out


def write_frontier_report(sweep_dir: str | Path) -> Path:
    """Write ``sweep_dir/frontier.md`` and its figures (``sweep_dir/figures/frontier_*.png``); return the path."""
    sweep_dir = Path(sweep_dir)
    figures = sweep_dir / "figures"
    points, missing = read_points(sweep_dir)
    groups = summarize_settings(points)
    sft = (((read_json(sweep_dir / "base" / "eval.json") or {}).get("policies") or {}).get("sft")) or {}
    sft_gold = sft.get("gold_reward_mean")
    bon = sorted((read_json(sweep_dir / "best_of_n.json") or {}).get("points") or [], key=lambda p: p["n"])
    data, fits = fit_points(points, sft_gold, bon)

    lines = ["# Reward–KL frontier sweep", ""]
    total = len(points) + len(missing)
    methods = sorted({p.method for p in points})
    lines.append(f"{len(points)} of {total} points finished; methods: {', '.join(methods) or 'none'}.")
    if sft_gold is not None:
        lines.append(
            f"SFT reference (`base/eval.json`): gold reward {_pm(sft_gold, _sem(sft, 'gold_reward'))}, "
            f"proxy reward {_num(sft.get('proxy_reward_mean'))}, KL 0."
        )
    else:
        lines.append("No `base/eval.json` with the `sft` policy's gold reward: no SFT point and no RL fits.")
    lines += ["", "## Settings", "", "Mean ± standard error over seeds (s.e. – for a single seed).", ""]
    rows = [
        [g.method, g.setting_label, ", ".join(map(str, g.seeds)), _pm(*g.gold), _pm(*g.kl), _num(g.proxy)]
        for g in groups
    ]
    lines += _table(["method", "setting", "seeds", "gold reward", "KL (nats)", "proxy reward"], rows) if rows else []
    if bon:
        lines += ["", "## Best-of-n (SFT samples picked by the proxy)", ""]
        bon_rows = [
            [p["n"], f"{p['kl']:.3f}", f"{p['d']:.3f}", _pm(p["gold_mean"], p.get("gold_se")), _num(p["proxy_mean"])]
            for p in bon
        ]
        lines += _table(["n", "KL (nats)", "d = sqrt(KL)", "gold reward", "proxy reward"], bon_rows)

    lines += ["", "## Frontier", ""]
    fig1 = plot_gold_vs_kl(groups, sft_gold, bon, figures / "frontier_gold_vs_kl.png")
    fig2 = plot_gold_vs_sqrt_kl(data, fits, figures / "frontier_gold_vs_sqrt_kl.png")
    for fig, caption in ((fig1, "gold reward vs KL"), (fig2, "gold reward vs sqrt(KL) with fitted forms")):
        if fig is not None:
            lines += [f"![{caption}]({fig.relative_to(sweep_dir)})", ""]
    lines += [dominance_line(groups, bon, sft_gold), ""]

    lines += ["## Fits of Gao et al. (2022)", ""]
    lines.append(
        "d = sqrt(KL); r = gold reward − SFT gold reward. Best-of-n: r = d(α − β d); RL: r = d(α − β ln d), "
        "fitted on every seed's point of the method by least squares without intercept; peak KL = d*² "
        "where the fitted r is highest."
    )
    lines.append("")
    fit_rows = [
        [f.method, f.form, _num(f.alpha, ".4f"), _num(f.beta, ".4f"), f.n_points, _num(f.rmse, ".4f")] + [_peak_cell(f)]
        for f in fits
    ]
    lines += _table(["method", "form", "α", "β", "points", "RMSE", "peak KL"], fit_rows) if fit_rows else ["No fits."]

    lines += ["", "## Over-optimisation along training", ""]
    fig3 = plot_sweep_overoptimization(_trajectories(points), figures / "frontier_overoptimization.png")
    if fig3 is not None:
        lines += [
            "Proxy and gold reward against KL during training, the lowest seed of each setting.",
            "",
            f"![over-optimisation]({fig3.relative_to(sweep_dir)})",
        ]
    else:
        lines.append("No point logged `eval/kl` with `eval/gold_reward` or `eval/proxy_reward` during training.")

    if missing:
        lines += ["", f"## Missing points ({len(missing)})", ""]
        lines += [f"- `{name}`: {why}" for name, why in missing]
    path = sweep_dir / "frontier.md"
    path.write_text("\n".join(lines) + "\n")
    log.info("wrote %s", path)
    return path


def _peak_cell(f: MethodFit) -> str:
    if f.error is not None:
        return f"not fitted: {f.error}"
    if f.peak_kl is None:
        return "none (β ≤ 0: still rising)"
    beyond = f" (beyond the largest KL fitted, {f.max_kl:.3g})" if f.peak_kl > f.max_kl else ""
    return f"{f.peak_kl:.3g}{beyond}"


def _sem(metrics: dict[str, Any], key: str) -> float | None:
    std, n = metrics.get(f"{key}_std"), metrics.get("n_samples")
    return std / math.sqrt(n) if std is not None and n else None


def dominance_line(groups: list[SettingSummary], bon: list[dict[str, Any]], sft_gold: float | None) -> str:
    """ "Which method dominates where": the method of the highest mean gold reward in each KL bin."""
    candidates = [("sft", 0.0, sft_gold)] if sft_gold is not None else []
    candidates += [(BON, p["kl"], p["gold_mean"]) for p in bon]
    candidates += [(g.method, g.kl[0], g.gold[0]) for g in groups]
    if not candidates:
        return "No finished point to compare."
    bins = dominance(candidates, kl_bin_edges(max(c[1] for c in candidates)))
    parts = [f"KL [{lo:g}, {hi:g}): **{m}** ({gold:.3f})" for lo, hi, m, gold in bins]
    return "Which method dominates where (highest mean gold reward per KL bin): " + "; ".join(parts) + "."


def main(argv: list[str] | None = None) -> Path:
    """``python -m rlhf_lightning.report.frontier SWEEP_DIR``."""
    p = argparse.ArgumentParser(prog="python -m rlhf_lightning.report.frontier", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = write_frontier_report(args.sweep_dir)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
