"""The sweep report's figures (:mod:`rlhf_lightning.report.frontier`): Agg canvas, no pyplot state.

Each ``plot_*`` function saves a PNG and returns its path, or returns None when the data
it needs is absent. Methods keep one colour across the figures (:func:`method_colors`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rlhf_lightning.eval.frontier import bon_form, rl_form
from rlhf_lightning.report.figures import _figure, _save

if TYPE_CHECKING:
    from rlhf_lightning.report.frontier import MethodFit, SettingSummary

BON = "best-of-n"


def method_colors(methods: list[str]) -> dict[str, str]:
    """``{method: matplotlib colour}``: best-of-n black, the others the default cycle in sorted order."""
    others = sorted(m for m in set(methods) if m != BON)
    return {BON: "black", **{m: f"C{i % 10}" for i, m in enumerate(others)}}


def _err(se: float | None) -> float:
    """An error-bar half-width: 0 where the standard error is unknown (one seed)."""
    return 0.0 if se is None or math.isnan(se) else se


def plot_gold_vs_kl(
    groups: list[SettingSummary], sft_gold: float | None, bon: list[dict[str, Any]], path: Path
) -> Path | None:
    """Gold reward vs KL: each setting's mean over seeds with s.e. bars in x and y, per method.

    A method's settings are joined in KL order; best-of-n is a dashed black curve and the
    SFT policy a star at KL 0.
    """
    if not groups and not bon:
        return None
    colors = method_colors([g.method for g in groups])
    fig, (ax,) = _figure(1, size=(6.5, 4.5))
    if bon:
        ax.errorbar(
            [p["kl"] for p in bon],
            [p["gold_mean"] for p in bon],
            yerr=[_err(p.get("gold_se")) for p in bon],
            color=colors[BON],
            linestyle="--",
            marker=".",
            capsize=2,
            label=BON,
        )
    for method in sorted({g.method for g in groups}):
        mine = sorted((g for g in groups if g.method == method), key=lambda g: g.kl[0])
        xs, ys = [g.kl[0] for g in mine], [g.gold[0] for g in mine]
        ax.plot(xs, ys, color=colors[method], alpha=0.4, linewidth=1)
        ax.errorbar(
            xs,
            ys,
            xerr=[_err(g.kl[1]) for g in mine],
            yerr=[_err(g.gold[1]) for g in mine],
            fmt="o",
            color=colors[method],
            capsize=3,
            label=method,
        )
        for g in mine:
            ax.annotate(g.setting_label, (g.kl[0], g.gold[0]), xytext=(4, 4), textcoords="offset points", fontsize=6)
    if sft_gold is not None:
        ax.plot([0.0], [sft_gold], marker="*", markersize=12, color="gold", markeredgecolor="black", label="sft")
    ax.set_xlabel("KL(policy || SFT) on held-out prompts (nats)")
    ax.set_ylabel("gold reward (mean ± s.e. over seeds)")
    ax.set_title("reward–KL frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_gold_vs_sqrt_kl(
    points: dict[str, tuple[list[float], list[float]]], fits: list[MethodFit], path: Path
) -> Path | None:
    """Gold reward relative to SFT against ``d = sqrt(KL)``, every seed's point, with Gao et al.'s fitted curves.

    Args:
        points: ``{method: (d values, r values)}``, best-of-n under ``"best-of-n"``.
        fits: the fitted curves drawn (those with parameters).
    """
    if not points:
        return None
    colors = method_colors(list(points))
    fig, (ax,) = _figure(1, size=(6.5, 4.5))
    d_max = max((max(ds) for ds, _ in points.values() if ds), default=1.0) * 1.1 or 1.0
    grid = np.linspace(0.0, d_max, 200)
    for method, (ds, rs) in sorted(points.items()):
        ax.plot(ds, rs, "o", color=colors[method], alpha=0.6, markersize=4, label=f"{method} ({len(ds)} points)")
    for f in fits:
        if f.alpha is None:
            continue
        form = bon_form if f.form == "best-of-n" else rl_form
        ax.plot(
            grid,
            form(grid, f.alpha, f.beta),
            color=colors.get(f.method, "grey"),
            linestyle="--" if f.method == BON else "-",
            linewidth=1.2,
            label=f"{f.method} {f.form} fit: α={f.alpha:.3g}, β={f.beta:.3g}",
        )
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("d = sqrt(KL) (nats^0.5)")
    ax.set_ylabel("gold reward − SFT gold reward")
    ax.set_title("gold reward vs sqrt(KL), Gao et al. (2022) forms")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    return _save(fig, path)


def plot_sweep_overoptimization(
    trajectories: dict[str, list[tuple[str, dict[str, list[tuple[float, float]]]]]], path: Path
) -> Path | None:
    """One panel per method: gold (solid) and proxy (dashed) reward against KL along training.

    Args:
        trajectories: ``{method: [(label, eval_trajectory), ...]}``, one entry per setting
            (its lowest seed); a colour per setting.
    """
    methods = [m for m, runs in sorted(trajectories.items()) if any(t for _, t in runs)]
    if not methods:
        return None
    fig, axes = _figure(len(methods), cols=min(3, len(methods)), size=(4.8, 3.6))
    for ax, method in zip(axes, methods, strict=False):
        for i, (label, traj) in enumerate(trajectories[method]):
            for name, style in (("gold", "-"), ("proxy", "--")):
                if name in traj:
                    xs, ys = zip(*traj[name], strict=True)
                    legend = label if name == "gold" else None  # one legend entry per setting
                    ax.plot(xs, ys, style, marker="o", markersize=2, color=f"C{i % 10}", label=legend)
        ax.set_title(f"{method}: gold (—) and proxy (--) along training", fontsize=8)
        ax.set_xlabel("KL(policy || SFT) (nats)", fontsize=8)
        ax.set_ylabel("reward", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=5)
    return _save(fig, path)
