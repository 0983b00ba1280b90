"""A markdown report of a run: training curves, reward vs KL, reward-model accuracy, samples, timings.

``python -m rlhf_lightning.report RUN_DIR`` reads what the stages left in ``RUN_DIR``:

* ``<stage>/logs/metrics.csv`` (Lightning's ``CSVLogger``; ``logs/version_*/metrics.csv`` too),
* ``eval.json`` and ``eval_samples.jsonl`` (``rlhf-lightning evaluate``; also looked for in ``eval/``),
* ``data/summary.json`` (the demo task's preference noise ceiling), ``pipeline_state.json``
  (stage wall times),

and writes ``RUN_DIR/report.md`` with PNG figures in ``RUN_DIR/figures/``. Anything
missing (a stage, a column, a file) is skipped, never an error. Figures are drawn on
``matplotlib.figure.Figure`` objects (Agg canvas), so no global pyplot state is touched.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_STAGES = ("sft", "reward", "ppo", "dpo")

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
SKIP_COLUMNS = {"ppo/iteration"}


# ----------------------------------------------------------------------------- reading


def read_metrics_csv(path: str | os.PathLike) -> dict[str, list[tuple[float, float]]]:
    """``{column: [(step, value), ...]}`` from a Lightning ``metrics.csv``, skipping blank cells.

    The x value is the ``step`` column (the row number when absent or blank); rows keep file order.
    """
    series: dict[str, list[tuple[float, float]]] = {}
    with open(path, newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            step = _float(row.get("step"))
            x = float(i) if step is None else step
            for key, cell in row.items():
                if key in (None, "step", "epoch"):
                    continue
                value = _float(cell)
                if value is not None:
                    series.setdefault(key, []).append((x, value))
    return series


def _float(cell: Any) -> float | None:
    try:
        value = float(cell)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def find_metrics_csv(stage_dir: Path) -> Path | None:
    """``stage_dir/logs/metrics.csv``, else the newest ``logs/version_*/metrics.csv``; a ``.csv`` path as is."""
    if stage_dir.suffix == ".csv":
        return stage_dir if stage_dir.is_file() else None
    direct = stage_dir / "logs" / "metrics.csv"
    if direct.is_file():
        return direct
    versions = sorted((stage_dir / "logs").glob("version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    return versions[-1] if versions else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        if path.exists():
            log.warning("could not read %s: %s", path, err)
        return None


def _find_eval(run_dir: Path) -> Path | None:
    for cand in (run_dir / "eval.json", run_dir / "eval" / "eval.json"):
        if cand.is_file():
            return cand
    return None


def _read_samples(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


# ----------------------------------------------------------------------------- figures


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


def plot_training_curves(stage: str, series: dict[str, list], path: Path) -> Path | None:
    """Small multiples of the known panels present in ``series``, then any other ``a/b`` columns."""
    panels, used = [], set()
    for title, columns in PANELS:
        present = [v for c in columns for v in _variants(c) if v in series and v not in used]
        if present:
            panels.append((title, present))
            used.update(present)
    for key in series:
        if "/" in key and key not in used and key not in SKIP_COLUMNS and len(panels) < MAX_PANELS:
            panels.append((key, [key]))
            used.add(key)
    if not panels:
        return None
    panels = panels[:MAX_PANELS]
    fig, axes = _figure(len(panels), cols=min(4, len(panels)))
    for ax, (title, columns) in zip(axes, panels):
        for c in columns:
            xs, ys = zip(*series[c])
            style = dict(marker="o", markersize=3) if len(xs) < 30 else {}
            ax.plot(xs, ys, label=c, **style)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(columns) > 1:
            ax.legend(fontsize=6)
    fig.suptitle(f"{stage}: training curves")
    return _save(fig, path)


def _eval_trajectory(series: dict[str, list]) -> dict[str, list[tuple[float, float]]]:
    """``{"gold": [(kl, gold)], "proxy": [(kl, proxy)]}`` joined on the step of each eval/kl row."""
    kl = dict(series.get("eval/kl", []))
    out = {}
    for name in ("gold", "proxy"):
        pts = [(kl[s], v) for s, v in series.get(f"eval/{name}_reward", []) if s in kl]
        if pts:
            out[name] = pts
    return out


def plot_overoptimization(stage: str, series: dict[str, list], path: Path) -> Path | None:
    """Gold and proxy reward against KL along training (Gao et al.'s over-optimisation picture)."""
    traj = _eval_trajectory(series)
    if not traj:
        return None
    fig, (ax,) = _figure(1, size=(5.5, 4.0))
    for name, color in (("proxy", "tab:orange"), ("gold", "tab:blue")):
        if name in traj:
            xs, ys = zip(*traj[name])
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
    ``_eval_trajectory``) are drawn faintly behind for context.
    """
    key = "gold_reward" if any("gold_reward_mean" in m for m in policies.values()) else "proxy_reward"
    points = [(name, m) for name, m in policies.items() if f"{key}_mean" in m and "kl_to_ref" in m]
    if not points:
        return None
    fig, (ax,) = _figure(1, size=(5.5, 4.0))
    for stage, traj in (trajectories or {}).items():
        if key.split("_")[0] in traj:
            xs, ys = zip(*traj[key.split("_")[0]])
            ax.plot(xs, ys, color="grey", alpha=0.4, linewidth=1, label=f"{stage} during training")
    for i, (name, m) in enumerate(points):
        n = max(1, m.get("n_samples", 1))
        sem = m.get(f"{key}_std", 0.0) / math.sqrt(n)
        ax.errorbar(m["kl_to_ref"], m[f"{key}_mean"], yerr=sem, fmt="o", capsize=3, label=name)
        # Stagger the labels a little so policies at the same point stay readable.
        ax.annotate(name, (m["kl_to_ref"], m[f"{key}_mean"]), textcoords="offset points",
                    xytext=(6, 6 - 11 * (i % 3)), fontsize=8)
    ax.set_xlabel("KL(policy || reference) (nats)")
    ax.set_ylabel(f"{key.replace('_', ' ')} (mean ± s.e.)")
    ax.set_title("reward vs KL frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_rm_accuracy(series: dict[str, list], ceiling: float | None, path: Path) -> Path | None:
    """Reward-model accuracy over training, with the data's noise ceiling and chance."""
    columns = [c for c in ("rm/accuracy", "rm/accuracy_step", "rm/accuracy_epoch", "val/rm/accuracy",
                           "val/rm/accuracy_epoch") if c in series]
    if not columns:
        return None
    fig, (ax,) = _figure(1, size=(5.5, 4.0))
    for c in columns:
        xs, ys = zip(*series[c])
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


# ----------------------------------------------------------------------------- markdown

METRIC_COLUMNS = (
    ("gold reward", "gold_reward_mean", "gold_reward_std"), ("proxy reward", "proxy_reward_mean", None),
    ("KL to ref", "kl_to_ref", None), ("win vs {b} (gold)", "win_rate_vs_{b}_gold", None),
    ("win vs {b} (proxy)", "win_rate_vs_{b}_proxy", None), ("EOS rate", "eos_rate", None),
    ("length", "response_length_mean", None), ("distinct-1", "distinct_1", None),
    ("distinct-2", "distinct_2", None), ("n", "n_samples", None),
)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def metrics_table(policies: dict[str, dict], baseline: str = "sft") -> list[str]:
    """Markdown lines: one row per policy; only columns that some policy has."""
    cols = [(t.format(b=baseline), k.format(b=baseline), s) for t, k, s in METRIC_COLUMNS]
    cols = [c for c in cols if any(c[1] in m for m in policies.values())]
    rows = []
    for name, m in policies.items():
        row = [f"**{name}**"]
        for _, key, std in cols:
            v = m.get(key)
            if v is None:
                row.append("–")
            elif isinstance(v, int):
                row.append(str(v))
            else:
                row.append(f"{v:.3f}" + (f" ± {m[std]:.3f}" if std and std in m else ""))
        rows.append(row)
    return _table(["policy"] + [c[0] for c in cols], rows)


def _settings_line(settings: dict, baseline: str) -> str:
    """One sentence on how the policies were evaluated, from whatever ``settings`` holds."""
    facts = []
    if "n_prompts" in settings:
        where = f" from `{settings['prompts_file']}`" if settings.get("prompts_file") else ""
        facts.append(f"{settings['n_prompts']} held-out prompts{where}, one sample per policy")
    if settings.get("reference"):
        facts.append(f"reference `{settings['reference']}`")
    if settings.get("reward_model"):
        facts.append(f"reward model `{settings['reward_model']}`")
    if settings.get("gold_reward"):
        facts.append(f"gold reward `{settings['gold_reward']}`")
    if "seed" in settings:
        facts.append(f"seed {settings['seed']}")
    if settings.get("sampling"):
        facts.append("sampling " + ", ".join(f"{k}={v}" for k, v in settings["sampling"].items()))
    lead = "; ".join(facts) + ". " if facts else ""
    return (lead + "KL is the Monte-Carlo estimate of KL(policy ‖ reference) per sequence; win rates compare "
            f"each prompt's sample with `{baseline}`'s (a tie counts ½).")


def _last(series: dict[str, list], *columns: str) -> float | None:
    for c in columns:
        if series.get(c):
            return series[c][-1][1]
    return None


def _rel(path: Path, run_dir: Path) -> str:
    return Path(os.path.relpath(path, run_dir)).as_posix()


def _resolve_stages(run_dir: Path, stages: dict[str, str] | None) -> dict[str, Path]:
    if stages is not None:
        return {name: (Path(p) if Path(p).is_absolute() else run_dir / p) for name, p in stages.items()}
    found = {s: run_dir / s for s in DEFAULT_STAGES}
    for child in sorted(run_dir.iterdir()) if run_dir.is_dir() else []:
        if child.is_dir() and child.name not in found and find_metrics_csv(child):
            found[child.name] = child
    return found


def summary_lines(run_dir: str | os.PathLike) -> list[str]:
    """A plain-text summary of a run for the terminal: the held-out table and the RM accuracy.

    Reads ``eval.json``, the reward stage's ``metrics.csv`` and ``data/summary.json``;
    whatever is missing is left out.
    """
    run_dir = Path(run_dir)
    lines: list[str] = []
    eval_path = _find_eval(run_dir)
    evaluation = (_read_json(eval_path) if eval_path else None) or {}
    policies = evaluation.get("policies") or {}
    baseline = (evaluation.get("settings") or {}).get("baseline", "sft")
    if policies:
        # Short headers (a terminal line); the report's table has every METRIC_COLUMNS entry.
        cols = [("gold", "gold_reward_mean"), ("proxy", "proxy_reward_mean"), ("KL", "kl_to_ref"),
                ("EOS", "eos_rate"), ("length", "response_length_mean"),
                (f"win/{baseline}", f"win_rate_vs_{baseline}_gold")]
        cols = [c for c in cols if any(c[1] in m for m in policies.values())]
        width = max(6, *(len(n) for n in policies))
        lines.append(f"{'policy':<{width}}" + "".join(f"{t:>9}" for t, _ in cols))
        for name, m in policies.items():
            cells = "".join(f"{m[k]:>9.3f}" if isinstance(m.get(k), (int, float)) else f"{'-':>9}" for _, k in cols)
            lines.append(f"{name:<{width}}{cells}")
    reward_csv = find_metrics_csv(run_dir / "reward")
    if reward_csv is not None:
        try:
            val = _last(read_metrics_csv(reward_csv), "val/rm/accuracy", "val/rm/accuracy_epoch")
        except (OSError, csv.Error):
            val = None
        ceiling = (_read_json(run_dir / "data" / "summary.json") or {}).get("preference_ceiling_val")
        if val is not None:
            lines.append(f"reward model: validation accuracy {val:.3f}"
                         + (f" (label-noise ceiling {ceiling:.3f})" if ceiling is not None else ""))
    return lines


def write_report(run_dir: str | os.PathLike, stages: dict[str, str] | None = None, n_samples: int = 3) -> Path:
    """Write ``run_dir/report.md`` and ``run_dir/figures/*.png``; return the markdown's path.

    Args:
        run_dir: the run directory (e.g. ``runs/demo``).
        stages: ``{stage name: stage directory}`` (relative to ``run_dir`` or absolute, or a
            ``metrics.csv`` path); default: ``sft``, ``reward``, ``ppo``, ``dpo`` and any other
            sub-directory with ``logs/metrics.csv``. Missing ones are skipped.
        n_samples: prompts shown in the sample section (each with every policy's response).
    """
    run_dir = Path(run_dir)
    figures = run_dir / "figures"
    md: list[str] = [f"# RLHF run report: `{run_dir.resolve().name}`", ""]

    series = {}
    for name, stage_dir in _resolve_stages(run_dir, stages).items():
        path = find_metrics_csv(stage_dir)
        if path is not None:
            try:
                series[name] = read_metrics_csv(path)
            except (OSError, csv.Error) as err:
                log.warning("skipping stage %s: could not read %s (%s)", name, path, err)
    trajectories = {s: t for s, t in ((s, _eval_trajectory(v)) for s, v in series.items()) if t}

    # Held-out evaluation of the policies.
    eval_path = _find_eval(run_dir)
    evaluation = _read_json(eval_path) if eval_path else None
    policies = (evaluation or {}).get("policies") or {}
    settings = (evaluation or {}).get("settings") or {}
    baseline = settings.get("baseline", "sft")
    if policies:
        md += ["## Policies on held-out prompts", ""]
        md += [_settings_line(settings, baseline), ""]
        md += metrics_table(policies, baseline) + [""]
        fig = plot_frontier(policies, figures / "frontier.png", trajectories)
        if fig:
            md += ["### Reward vs KL frontier", "",
                   "Each policy is a point; higher and further left is better (the DPO paper's frontier).", "",
                   f"![reward vs KL frontier]({_rel(fig, run_dir)})", ""]

    # Over-optimisation along training.
    for stage, s in series.items():
        fig = plot_overoptimization(stage, s, figures / f"{stage}_gold_proxy_vs_kl.png")
        if fig:
            traj = trajectories[stage]
            md += [f"## Over-optimisation: gold vs proxy reward along {stage}", "",
                   "Gao et al. (2022): as KL grows the proxy reward keeps rising while the gold reward "
                   "peaks and falls.", ""]
            for name in ("gold", "proxy"):
                if name in traj:
                    (k0, v0), (k1, v1) = traj[name][0], traj[name][-1]
                    best = max(traj[name], key=lambda p: p[1])
                    md.append(f"- {name}: {v0:.3f} at KL {k0:.2f} → {v1:.3f} at KL {k1:.2f} "
                              f"(best {best[1]:.3f} at KL {best[0]:.2f})")
            md += ["", f"![gold and proxy reward vs KL]({_rel(fig, run_dir)})", ""]

    # Reward-model accuracy beside its noise ceiling.
    summary = _read_json(run_dir / "data" / "summary.json") or {}
    ceiling = summary.get("preference_ceiling_val")
    for stage, s in series.items():
        fig = plot_rm_accuracy(s, ceiling, figures / f"{stage}_rm_accuracy.png")
        if fig:
            val = _last(s, "val/rm/accuracy", "val/rm/accuracy_epoch")
            train = _last(s, "rm/accuracy_epoch", "rm/accuracy", "rm/accuracy_step")
            md += [f"## Reward model accuracy ({stage})", ""]
            facts = []
            if val is not None:
                facts.append(f"final validation accuracy **{val:.3f}**")
            if train is not None:
                facts.append(f"last training accuracy {train:.3f}")
            if ceiling is not None:
                facts.append(f"noise ceiling {ceiling:.3f} (the accuracy of the gold reward itself on the "
                             "noisy labels)")
            facts.append("chance 0.5")
            md += ["; ".join(facts) + ".", "", f"![reward model accuracy]({_rel(fig, run_dir)})", ""]

    # Training curves per stage.
    curves = [(stage, plot_training_curves(stage, s, figures / f"{stage}_curves.png")) for stage, s in series.items()]
    curves = [(stage, fig) for stage, fig in curves if fig]
    if curves:
        md += ["## Training curves", ""]
        for stage, fig in curves:
            md += [f"### {stage}", "", f"![{stage} training curves]({_rel(fig, run_dir)})", ""]

    # Sample responses: the same prompts for every policy.
    samples = _read_samples(eval_path.parent / "eval_samples.jsonl") if eval_path else []
    if samples:
        md += ["## Sample responses", ""]
        indices = sorted({r.get("index", 0) for r in samples})[:n_samples]
        for i in indices:
            rows = [r for r in samples if r.get("index", 0) == i]
            md += [f"**Prompt {i}:** {_cell(rows[0].get('prompt', ''))}", ""]
            table_rows = [[r.get("policy", "?"), r.get("response", ""),
                           *("–" if r.get(k) is None else f"{r[k]:.3f}" for k in ("gold", "proxy", "kl"))]
                          for r in rows]
            md += _table(["policy", "response", "gold", "proxy", "KL"], table_rows) + [""]

    # Stage wall times.
    state = _read_json(run_dir / "pipeline_state.json") or {}
    times = [(name, info.get("seconds")) for name, info in (state.get("stages") or {}).items()
             if isinstance(info, dict) and isinstance(info.get("seconds"), (int, float))]
    if times:
        md += ["## Stage wall times", ""]
        md += _table(["stage", "seconds", "minutes"], [[n, f"{t:.1f}", f"{t / 60:.1f}"] for n, t in times])
        md += [f"| **total** | {sum(t for _, t in times):.1f} | {sum(t for _, t in times) / 60:.1f} |", ""]

    if len(md) == 2:
        md += ["Nothing to report yet: no eval.json, no stage metrics.", ""]
    out = run_dir / "report.md"
    run_dir.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(md))
    log.info("wrote %s", out)
    return out


def main(argv: list[str] | None = None) -> Path:
    """``python -m rlhf_lightning.report RUN_DIR [--stage NAME=DIR ...]``."""
    p = argparse.ArgumentParser(prog="python -m rlhf_lightning.report", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--stage", action="append", default=None, metavar="NAME=DIR",
                   help="a stage and its directory (repeat); default: sft, reward, ppo, dpo and any other")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stages = None
    if args.stage:
        stages = dict(s.split("=", 1) for s in args.stage)
    out = write_report(args.run_dir, stages)
    print(out)
    return out


if __name__ == "__main__":
    main()
