"""The SLURM side of a sweep: the commands and the job-array scripts (pure functions)."""

from __future__ import annotations

import shlex
from pathlib import Path


def point_command(point_yaml: Path | str, python: str | None = None) -> list[str]:
    """The command that runs one point (a pipeline run of its ``point.yaml``)."""
    prefix = [python, "-m", "rlhf_lightning.cli"] if python else ["rlhf-lightning"]
    return [*prefix, "pipeline", "-c", str(point_yaml)]


def slurm_scripts(
    run_dir: str,
    n_points: int,
    base_config: str,
    sweep_config: str,
    workdir: str,
    partition: str | None = None,
    time_limit: str = "04:00:00",
    gpus_per_task: int = 1,
    cpus_per_task: int = 8,
    max_parallel: int | None = None,
    setup: str = "",
    extra: list[str] | None = None,
) -> dict[str, str]:
    """The text of the SLURM scripts (a pure function: see :meth:`Sweep.write_slurm`)."""

    def header(name: str, array: str | None = None) -> str:
        lines = ["#!/bin/bash", f"#SBATCH --job-name={name}", f"#SBATCH --output={run_dir}/slurm/{name}-%A_%a.log"]
        if partition:
            lines.append(f"#SBATCH --partition={partition}")
        lines += [f"#SBATCH --time={time_limit}", f"#SBATCH --cpus-per-task={cpus_per_task}"]
        if gpus_per_task:
            lines.append(f"#SBATCH --gpus-per-task={gpus_per_task}")
        if array:
            lines.append(f"#SBATCH --array={array}")
        lines += [f"#SBATCH {x}" for x in extra or []]
        lines += ["set -euo pipefail", f"cd {shlex.quote(workdir)}"]
        if setup:
            lines.append(setup)
        return "\n".join(lines) + "\n"

    array = f"0-{n_points - 1}" + (f"%{max_parallel}" if max_parallel else "") if n_points else None
    scripts = {
        "base.sbatch": header("sweep-base") + f"rlhf-lightning pipeline -c {shlex.quote(base_config)}\n",
        "report.sbatch": header("sweep-report")
        + f"rlhf-lightning sweep -c {shlex.quote(sweep_config)} --report_only true\n",
    }
    submit = ["#!/bin/bash", "set -euo pipefail", f"cd {shlex.quote(run_dir)}/slurm"]
    submit.append("base=$(sbatch --parsable base.sbatch)")
    if array:
        scripts["points.sbatch"] = header("sweep-points", array) + (
            'point=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" ' + shlex.quote(f"{run_dir}/slurm/points.txt") + ")\n"
            'srun rlhf-lightning pipeline -c "$point"\n'
        )
        submit.append('points=$(sbatch --parsable --dependency=afterok:"$base" points.sbatch)')
        submit.append('sbatch --dependency=afterany:"$points" report.sbatch')
    else:
        submit.append('sbatch --dependency=afterok:"$base" report.sbatch')
    scripts["submit.sh"] = "\n".join(submit) + "\n"
    return scripts
