"""The report's figures, drawn on ``matplotlib.figure.Figure`` objects (Agg canvas, no pyplot state).

Each ``plot_*`` function saves a PNG and returns its path, or returns None when the data
it needs is absent.
"""

from __future__ import annotations

import math
from pathlib import Path

from rlhf_lightning.report.io import Series

# Panels of the training-curve figures: a title and the columns drawn on it. Validation
# (``val/...``) and Lightning's ``_step``/``_epoch`` variants of each column join its panel.
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("SFT loss", ("sft/loss",)),
    ("SFT perplexity", ("sft/ppl",)),
    ("RM loss", ("rm/loss",)),
    ("RM accuracy", ("rm/accuracy",)),
    ("RM margin", ("rm/margin",)),
    ("DPO loss", ("dpo/loss",)),
    ("DPO reward accuracy", ("dpo/reward_accuracy",)),
    ("DPO reward margin", ("dpo/reward_margin",)),
    ("DPO log-probs", ("dpo/chosen_logp", "dpo/rejected_logp")),
    ("PPO reward score", ("ppo/reward_score",)),
    ("PPO KL", ("ppo/kl",)),
    ("PPO KL coefficient", ("ppo/kl_coef",)),
    ("PPO entropy", ("ppo/entropy",)),
    ("PPO response length", ("ppo/response_length",)),
    ("PPO EOS rate", ("ppo/eos_rate",)),
    ("PPO losses", ("ppo/policy_loss", "ppo/value_loss")),
    ("PPO clip fraction", ("ppo/clipfrac",)),
    ("PPO approx KL", ("ppo/approx_kl",)),
    ("PPO explained variance", ("ppo/explained_variance",)),
    ("Eval reward", ("eval/gold_reward", "eval/proxy_reward")),
    ("Eval KL", ("eval/kl",)),
    ("Eval EOS rate", ("eval/eos_rate",)),
)
MAX_PANELS = 20
# The metric prefixes PANELS names; another prefix (grpo, rloo, ...) gets PPO's panels, whose names it shares.
KNOWN_PREFIXES = frozenset(c.split("/")[0] for _, cols in PANELS for c in cols)
ONLINE_RL_PANELS = tuple((title, cols) for title, cols in PANELS if cols[0].startswith("ppo/"))


def _figure(n_panels: int = 1, cols: int = 1, size: tuple[float, float] = (4.2, 3.0)):
    from matplotlib.figure import Figure

    rows = max(1, math.ceil(n_panels / cols))
    fig = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _variants(column: str) -> list[str]:
    """A column and its validation / step / epoch siblings, in drawing order."""
    out = []
    for base in (column, f"val/{column}", f"train/{column}"):
        out += [base, f"{base}_step", f"{base}_epoch"]
    return out


def _skipped(column: str) -> bool:
    return column.endswith("/iteration")  # a counter, not a curve


def panels_for(series: Series) -> list[tuple[str, tuple[str, ...]]]:
    """:data:`PANELS`, plus PPO's panels renamed for each other metric prefix in ``series``.

    ``grpo/kl`` gets a "GRPO KL" panel, ``rloo/reward_score`` a "RLOO reward score" one.
    """
    prefixes: list[str] = []
    for key in series:
        parts = key.split("/")
        if parts[0] in ("val", "train"):
            parts = parts[1:]
        if len(parts) > 1 and parts[0] not in KNOWN_PREFIXES and parts[0] not in prefixes:
            prefixes.append(parts[0])
    panels = list(PANELS)
    for p in prefixes:
        panels += [
            (title.replace("PPO", p.upper(), 1), tuple(f"{p}/{c.split('/', 1)[1]}" for c in cols))
            for title, cols in ONLINE_RL_PANELS
        ]
    return panels


def plot_training_curves(stage: str, series: Series, path: Path) -> Path | None:
    """Small multiples of the known panels present in ``series``, then any other ``a/b`` columns."""
    panels, used = [], set()
    for title, columns in panels_for(series):
        present = [v for c in columns for v in _variants(c) if v in series and v not in used]
        if present:
            panels.append((title, present))
            used.update(present)
    for key in series:
        if "/" in key and key not in used and not _skipped(key) and len(panels) < MAX_PANELS:
            panels.append((key, [key]))
            used.add(key)
    if not panels:
        return None
    panels = panels[:MAX_PANELS]
    fig, axes = _figure(len(panels), cols=min(4, len(panels)))
    for ax, (title, columns) in zip(axes, panels, strict=False):
        for c in columns:
            xs, ys = zip(*series[c], strict=True)
            style = {"marker": "o", "markersize": 3} if len(xs) < 30 else {}
            ax.plot(xs, ys, label=c, **style)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(columns) > 1:
            ax.legend(fontsize=6)
    fig.suptitle(f"{stage}: training curves")
    return _save(fig, path)


def eval_trajectory(series: Series) -> dict[str, list[tuple[float, float]]]:
    """``{"gold": [(kl, gold)], "proxy": [(kl, proxy)]}`` joined on the step of each eval/kl row."""
    kl = dict(series.get("eval/kl", []))
    out = {}
    for name in ("gold", "proxy"):
        pts = [(kl[s], v) for s, v in series.get(f"eval/{name}_reward", []) if s in kl]
        if pts:
            out[name] = pts
    return out


def plot_overoptimization(stage: str, series: Series, path: Path) -> Path | None:
    """Gold and proxy reward against KL along training (Gao et al.'s over-optimisation picture)."""
    traj = eval_trajectory(series)
    if not traj:
        return None
    fig, (ax,) = _figure(1, size=(5.5, 4.0))
    for name, color in (("proxy", "tab:orange"), ("gold", "tab:blue")):
        if name in traj:
            xs, ys = zip(*traj[name], strict=True)
            ax.plot(xs, ys, marker="o", markersize=3, color=color, label=f"{name} reward")
            ax.annotate("start", (xs[0], ys[0]), fontsize=7, color=color)
            ax.annotate("end", (xs[-1], ys[-1]), fontsize=7, color=color)
    ax.set_xlabel("KL(policy || reference) on held-out prompts (nats)")
    ax.set_ylabel("reward")
    ax.set_title(f"{stage}: gold vs proxy reward along training")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_frontier(policies: dict[str, dict], path: Path, trajectories: dict[str, dict] | None = None) -> Path | None:
    """Each policy as a labelled point in the reward-vs-KL plane (the DPO paper's frontier figure).

    Uses the gold reward when measured, else the proxy reward; error bars are one
    standard error of the mean. Training-time evaluations (``trajectories``: stage ->
    :func:`eval_trajectory`) are drawn faintly behind for context.
    """
    key = "gold_reward" if any("gold_reward_mean" in m for m in policies.values()) else "proxy_reward"
    points = [(name, m) for name, m in policies.items() if f"{key}_mean" in m and "kl_to_ref" in m]
    if not points:
        return None
    fig, (ax,) = _figure(1, size=(5.5, 4.0))
    for stage, traj in (trajectories or {}).items():
        if key.split("_")[0] in traj:
            xs, ys = zip(*traj[key.split("_")[0]], strict=True)
            ax.plot(xs, ys, color="grey", alpha=0.4, linewidth=1, label=f"{stage} during training")
    for i, (name, m) in enumerate(points):
        n = max(1, m.get("n_samples", 1))
        sem = m.get(f"{key}_std", 0.0) / math.sqrt(n)
        ax.errorbar(m["kl_to_ref"], m[f"{key}_mean"], yerr=sem, fmt="o", capsize=3, label=name)
        # Stagger the labels a little so policies at the same point stay readable.
        ax.annotate(
            name,
            (m["kl_to_ref"], m[f"{key}_mean"]),
            textcoords="offset points",
            xytext=(6, 6 - 11 * (i % 3)),
            fontsize=8,
        )
    ax.set_xlabel("KL(policy || reference) (nats)")
    ax.set_ylabel(f"{key.replace('_', ' ')} (mean ± s.e.)")
    ax.set_title("reward vs KL frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_rm_accuracy(series: Series, ceiling: float | None, path: Path) -> Path | None:
    """Reward-model accuracy over training, with the data's noise ceiling and chance."""
    columns = [
        c
        for c in ("rm/accuracy", "rm/accuracy_step", "rm/accuracy_epoch", "val/rm/accuracy", "val/rm/accuracy_epoch")
        if c in series
    ]
    if not columns:
        return None
    fig, (ax,) = _figure(1, size=(5.5, 4.0))
    for c in columns:
        xs, ys = zip(*series[c], strict=True)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=c)
    if ceiling is not None:
        ax.axhline(ceiling, color="tab:green", linestyle="--", label=f"noise ceiling {ceiling:.3f}")
    ax.axhline(0.5, color="grey", linestyle=":", label="chance 0.5")
    ax.set_xlabel("step")
    ax.set_ylabel("pairwise accuracy")
    ax.set_title("reward model accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)
