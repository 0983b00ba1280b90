"""The plain-text run summary the pipeline prints at the end: the held-out table and RM accuracy."""

from __future__ import annotations

import os
from pathlib import Path

from rlhf_lightning.eval.metrics import metric_columns
from rlhf_lightning.report.io import (
    discover_stages,
    last_value,
    noise_ceiling,
    read_eval,
    read_stage_series,
)


def summary_lines(run_dir: str | os.PathLike) -> list[str]:
    """A plain-text summary of a run for the terminal: the held-out table and the RM accuracy.

    The table has the summary columns of
    :data:`~rlhf_lightning.eval.metrics.METRIC_COLUMNS` (short headers) that some policy
    has, ``-`` where a policy lacks one; then one line per stage that logged a validation
    reward-model accuracy, beside the label-noise ceiling of ``data/summary.json`` when it applies.
    Whatever is missing is left out.
    """
    run_dir = Path(run_dir)
    lines: list[str] = []
    _, evaluation = read_eval(run_dir)
    policies = evaluation.get("policies") or {}
    baseline = (evaluation.get("settings") or {}).get("baseline", "sft")
    if policies:
        cols = metric_columns(policies, baseline, summary=True)
        width = max(6, *(len(n) for n in policies))
        lines.append(f"{'policy':<{width}}" + "".join(f"{c.short:>9}" for c in cols))
        for name, m in policies.items():
            cells = "".join(
                f"{m[c.key]:>9.3f}" if isinstance(m.get(c.key), (int, float)) else f"{'-':>9}" for c in cols
            )
            lines.append(f"{name:<{width}}{cells}")
    stages = discover_stages(run_dir, evaluation)
    for stage, series in read_stage_series(stages).items():
        val = last_value(series, "val/rm/accuracy", "val/rm/accuracy_epoch")
        if val is not None:
            ceiling = noise_ceiling(run_dir, stages[stage])
            who = "reward model" if stage == "reward" else f"reward model ({stage})"
            lines.append(
                f"{who}: validation accuracy {val:.3f}"
                + (f" (label-noise ceiling {ceiling:.3f})" if ceiling is not None else "")
            )
    return lines
