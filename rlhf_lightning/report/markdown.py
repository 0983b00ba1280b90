"""``report.md``: held-out comparison, frontier, over-optimisation, RM accuracy, curves, samples, timings."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from rlhf_lightning.eval.metrics import metric_columns
from rlhf_lightning.report.figures import (
    eval_trajectory,
    plot_frontier,
    plot_overoptimization,
    plot_rm_accuracy,
    plot_training_curves,
)
from rlhf_lightning.report.io import (
    last_value,
    noise_ceiling,
    read_eval,
    read_json,
    read_samples,
    read_stage_series,
    resolve_stages,
)

log = logging.getLogger(__name__)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def metrics_table(policies: dict[str, dict], baseline: str = "sft") -> list[str]:
    """Markdown lines: one row per policy; only the metric columns that some policy has."""
    cols = metric_columns(policies, baseline)
    rows = []
    for name, m in policies.items():
        row = [f"**{name}**"]
        for c in cols:
            v = m.get(c.key)
            if v is None:
                row.append("–")
            elif isinstance(v, int):
                row.append(str(v))
            else:
                row.append(f"{v:.3f}" + (f" ± {m[c.std]:.3f}" if c.std and c.std in m else ""))
        rows.append(row)
    return _table(["policy"] + [c.label for c in cols], rows)


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
    return (
        lead + "KL is the Monte-Carlo estimate of KL(policy ‖ reference) per sequence; win rates compare "
        f"each prompt's sample with `{baseline}`'s (a tie counts ½)."
    )


def _rel(path: Path, run_dir: Path) -> str:
    return Path(os.path.relpath(path, run_dir)).as_posix()


def _overoptimization_section(stage: str, traj: dict[str, list], fig: Path, run_dir: Path) -> list[str]:
    md = [
        f"## Over-optimisation: gold vs proxy reward along {stage}",
        "",
        "Gao et al. (2022): as KL grows the proxy reward keeps rising while the gold reward peaks and falls.",
        "",
    ]
    for name in ("gold", "proxy"):
        if name in traj:
            (k0, v0), (k1, v1) = traj[name][0], traj[name][-1]
            best = max(traj[name], key=lambda p: p[1])
            md.append(
                f"- {name}: {v0:.3f} at KL {k0:.2f} → {v1:.3f} at KL {k1:.2f} (best {best[1]:.3f} at KL {best[0]:.2f})"
            )
    return md + ["", f"![gold and proxy reward vs KL]({_rel(fig, run_dir)})", ""]


def _rm_accuracy_section(stage: str, series: dict, ceiling: float | None, fig: Path, run_dir: Path) -> list[str]:
    val = last_value(series, "val/rm/accuracy", "val/rm/accuracy_epoch")
    train = last_value(series, "rm/accuracy_epoch", "rm/accuracy", "rm/accuracy_step")
    facts = []
    if val is not None:
        facts.append(f"final validation accuracy **{val:.3f}**")
    if train is not None:
        facts.append(f"last training accuracy {train:.3f}")
    if ceiling is not None:
        facts.append(f"noise ceiling {ceiling:.3f} (the accuracy of the gold reward itself on the noisy labels)")
    facts.append("chance 0.5")
    return [
        f"## Reward model accuracy ({stage})",
        "",
        "; ".join(facts) + ".",
        "",
        f"![reward model accuracy]({_rel(fig, run_dir)})",
        "",
    ]


def _samples_section(samples: list[dict], n_samples: int) -> list[str]:
    md = ["## Sample responses", ""]
    for i in sorted({r.get("index", 0) for r in samples})[:n_samples]:
        rows = [r for r in samples if r.get("index", 0) == i]
        md += [f"**Prompt {i}:** {_cell(rows[0].get('prompt', ''))}", ""]
        table_rows = [
            [
                r.get("policy", "?"),
                r.get("response", ""),
                *("–" if r.get(k) is None else f"{r[k]:.3f}" for k in ("gold", "proxy", "kl")),
            ]
            for r in rows
        ]
        md += _table(["policy", "response", "gold", "proxy", "KL"], table_rows) + [""]
    return md


def _wall_times_section(state: dict) -> list[str]:
    times = [
        (name, info.get("seconds"))
        for name, info in (state.get("stages") or {}).items()
        if isinstance(info, dict) and isinstance(info.get("seconds"), (int, float))
    ]
    if not times:
        return []
    total = sum(t for _, t in times)
    md = ["## Stage wall times", ""]
    md += _table(["stage", "seconds", "minutes"], [[n, f"{t:.1f}", f"{t / 60:.1f}"] for n, t in times])
    return md + [f"| **total** | {total:.1f} | {total / 60:.1f} |", ""]


def _cai_section(run_dir: Path) -> list[str]:
    """The Constitutional-AI data stages' statistics (``cai_revise`` / ``cai_label`` ``stats.json``)."""
    revise = read_json(run_dir / "cai_revise" / "stats.json") or {}
    label = read_json(run_dir / "cai_label" / "stats.json") or {}
    if not revise and not label:
        return []
    md = ["## Constitutional AI", ""]
    if revise.get("counts"):
        c = revise["counts"]
        dropped = {k: v for k, v in c.items() if k not in ("prompts", "kept") and v}
        md += [f"SL-CAI (`cai_revise`): {c.get('kept')} of {c.get('prompts')} prompts kept; counted: {dropped}.", ""]
    if label.get("counts"):
        rows = [["pairs", label["counts"].get("pairs")]]
        for key in ("orders_disagree", "mean_confidence", "gold_agreement", "gold_soft_agreement"):
            if label.get(key) is not None:
                rows.append([key, label[key]])
        md += ["AI feedback (`cai_label`; the gold reward only measured against):", ""]
        md += _table(["statistic", "value"], rows) + [""]
    return md


def write_report(run_dir: str | os.PathLike, stages: dict[str, str] | None = None, n_samples: int = 3) -> Path:
    """Write ``run_dir/report.md`` and ``run_dir/figures/*.png``; return the markdown's path.

    Args:
        run_dir: the run directory (e.g. ``runs/demo``).
        stages: ``{stage name: stage directory}`` (relative to ``run_dir`` or absolute, or a
            ``metrics.csv`` path); default: every stage of the run with a ``metrics.csv``
            (see :func:`~rlhf_lightning.report.io.discover_stages`). Missing ones are skipped.
        n_samples: prompts shown in the sample section (each with every policy's response).
    """
    run_dir = Path(run_dir)
    figures = run_dir / "figures"
    md: list[str] = [f"# RLHF run report: `{run_dir.resolve().name}`", ""]

    eval_path, evaluation = read_eval(run_dir)
    stage_dirs = resolve_stages(run_dir, stages, evaluation)
    series = read_stage_series(stage_dirs)
    trajectories = {s: t for s, t in ((s, eval_trajectory(v)) for s, v in series.items()) if t}

    # Held-out evaluation of the policies.
    policies = evaluation.get("policies") or {}
    settings = evaluation.get("settings") or {}
    baseline = settings.get("baseline", "sft")
    if policies:
        md += ["## Policies on held-out prompts", ""]
        md += [_settings_line(settings, baseline), ""]
        md += metrics_table(policies, baseline) + [""]
        fig = plot_frontier(policies, figures / "frontier.png", trajectories)
        if fig:
            md += [
                "### Reward vs KL frontier",
                "",
                "Each policy is a point; higher and further left is better (the DPO paper's frontier).",
                "",
                f"![reward vs KL frontier]({_rel(fig, run_dir)})",
                "",
            ]

    # Over-optimisation along training.
    for stage, s in series.items():
        fig = plot_overoptimization(stage, s, figures / f"{stage}_gold_proxy_vs_kl.png")
        if fig:
            md += _overoptimization_section(stage, trajectories[stage], fig, run_dir)

    # Reward-model accuracy beside its noise ceiling.
    for stage, s in series.items():
        ceiling = noise_ceiling(run_dir, stage_dirs[stage])
        fig = plot_rm_accuracy(s, ceiling, figures / f"{stage}_rm_accuracy.png")
        if fig:
            md += _rm_accuracy_section(stage, s, ceiling, fig, run_dir)

    # Training curves per stage.
    curves = [(stage, plot_training_curves(stage, s, figures / f"{stage}_curves.png")) for stage, s in series.items()]
    curves = [(stage, fig) for stage, fig in curves if fig]
    if curves:
        md += ["## Training curves", ""]
        for stage, fig in curves:
            md += [f"### {stage}", "", f"![{stage} training curves]({_rel(fig, run_dir)})", ""]

    md += _cai_section(run_dir)

    # Sample responses: the same prompts for every policy.
    samples = read_samples(eval_path.parent / "eval_samples.jsonl") if eval_path else []
    if samples:
        md += _samples_section(samples, n_samples)

    md += _wall_times_section(read_json(run_dir / "pipeline_state.json") or {})

    if len(md) == 2:
        md += ["Nothing to report yet: no eval.json, no stage metrics.", ""]
    out = run_dir / "report.md"
    run_dir.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(md))
    log.info("wrote %s", out)
    return out
