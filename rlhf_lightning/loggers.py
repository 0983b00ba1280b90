"""A CSV logger whose ``metrics.csv`` survives a resumed run.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when a run starts, so a run
resumed into its own directory loses every row logged before the kill, and it writes
rows only every 100 steps, so a killed run loses the last ones. :class:`ResumableCSVLogger`
writes every row as it is logged and, when the run resumes from a checkpoint, continues
the file:

* the rows written before the checkpoint are kept (their number is in the checkpoint);
* of the rows written after it, those of the batch (or epoch end) the checkpoint was taken
  in are kept too, since the resumed run does not log them again; those from the step the
  resumed run starts at onwards are dropped, since it logs them again.

So after a kill and a resume every step is in the file once; the same holds for the rows of
``samples.jsonl`` (:func:`resume_logs`). A fresh run (no checkpoint)
into a directory with an old ``metrics.csv`` moves it aside to ``metrics.csv.1`` (an older
``.1`` becomes ``.2``, and so on) with a warning: nothing already logged is deleted.

The systems drive it (``systems/base.py``): :func:`log_positions` goes into each
checkpoint, :func:`resume_logs` is called when a checkpoint is loaded and
:func:`start_resumed_logs` at the first batch of the resumed run.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn


class _ContinuingWriter(ExperimentWriter):
    """``metrics.csv`` writer that decides at its first write whether to continue or set aside the old file."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self.rows_before = 0  # rows of an earlier run kept at the start of the file
        self.rows_logged = 0  # rows logged by this run
        self.resume_rows: int | None = None  # resumed: rows written before the checkpoint
        self.resume_step: float | None = None  # resumed: the first step this run logs
        self._started = False

    def _check_log_dir_exists(self) -> None:
        """Deliberately keeps the old metrics.csv (Lightning's version deletes it here): whether
        it is continued or set aside is decided at the first write, once it is known whether
        the run resumes."""

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics_dict, step)
        self.rows_logged += 1

    @property
    def rows(self) -> int:
        """Rows in the file once everything logged is written."""
        return self.rows_before + self.rows_logged

    def save(self) -> None:
        if not self._started:
            if self.resume_rows is not None and self.resume_step is None:
                return  # resumed, and its first step is not known yet: keep the rows in memory
            self._start()
        super().save()

    def _start(self) -> None:
        self._started = True
        if not self._fs.isfile(self.metrics_file_path):
            return
        if self.resume_rows is None:
            self._set_aside()
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            fieldnames, rows = list(reader.fieldnames or []), list(reader)
        kept = rows[: self.resume_rows] + [
            row for row in rows[self.resume_rows :] if _step(row) < (self.resume_step or math.inf)
        ]
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(kept)
        self.metrics_keys = fieldnames
        self.rows_before = len(kept)

    def _set_aside(self) -> None:
        path = self.metrics_file_path
        n = 1
        while self._fs.exists(f"{path}.{n}"):
            n += 1
        for i in range(n, 1, -1):
            self._fs.mv(f"{path}.{i - 1}", f"{path}.{i}")
        self._fs.mv(path, f"{path}.1")
        rank_zero_warn(f"{path} holds an earlier run's metrics and this run does not resume it: moved to {path}.1")


def _step(row: dict[str, str]) -> float:
    try:
        return float(row.get("step") or "nan")
    except ValueError:
        return math.nan


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` that writes every row at once and continues ``metrics.csv`` on resume.

    Same arguments as ``CSVLogger``, with ``flush_logs_every_n_steps`` defaulting to 1.
    """

    def __init__(
        self,
        save_dir: str,
        name: str | None = "lightning_logs",
        version: int | str | None = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 1,
    ):
        super().__init__(save_dir, name, version, prefix, flush_logs_every_n_steps)

    @property
    @rank_zero_experiment
    def experiment(self) -> _ContinuingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment

    @property
    @rank_zero_only
    def rows(self) -> int:
        """Rows of ``metrics.csv`` once everything logged so far is written."""
        return self.experiment.rows

    @rank_zero_only
    def resume(self, rows: int) -> None:
        """This run resumes from a checkpoint written when the file had ``rows`` rows."""
        self.experiment.resume_rows = self.experiment.rows_before = rows

    @rank_zero_only
    def start_resumed(self, step: int) -> None:
        """The resumed run logs from ``step`` on: older rows from that step are dropped."""
        writer = self.experiment
        if writer.resume_rows is not None and writer.resume_step is None:
            writer.resume_step = step
            self.save()

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self.save()  # a kill after this checkpoint loses no row written before it

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._experiment is not None and self._experiment.resume_step is None:
            self._experiment.resume_step = math.inf  # resumed, but no batch ran: keep every old row
        super().finalize(status)


def _resumable(trainer: L.Trainer) -> list[ResumableCSVLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, ResumableCSVLogger)]


def flush_logs(trainer: L.Trainer) -> None:
    """Write every row logged so far to each :class:`ResumableCSVLogger`'s file.

    Called before a checkpoint is written, so that the rows it counts are on disk once it is:
    a kill between the checkpoint and the logger's ``after_save_checkpoint`` (a barrier apart
    under DDP) would otherwise leave the file short of them.
    """
    for lg in _resumable(trainer):
        lg.save()


def samples_file(trainer: L.Trainer) -> Path:
    """Where :func:`~rlhf_lightning.callbacks.log_samples` writes: ``samples.jsonl`` in the first
    logger's directory (``Trainer.log_dir``, without its broadcast), else in ``default_root_dir``."""
    directory = None
    if trainer.loggers:
        first = trainer.loggers[0]
        directory = first.log_dir if isinstance(first, (CSVLogger, TensorBoardLogger)) else first.save_dir
    return Path(directory or trainer.default_root_dir) / "samples.jsonl"


def log_positions(trainer: L.Trainer) -> dict[str, int]:
    """For a checkpoint: ``{log_dir: rows}`` of each :class:`ResumableCSVLogger`, and the size in
    bytes of the run's ``samples.jsonl`` under its absolute path."""
    positions = {os.path.abspath(lg.log_dir): lg.rows or 0 for lg in _resumable(trainer)}
    samples = samples_file(trainer)
    positions[os.path.abspath(samples)] = samples.stat().st_size if samples.is_file() else 0
    return positions


def resume_logs(trainer: L.Trainer, positions: dict[str, int] | None) -> None:
    """Tell each logger that the run resumes from a checkpoint with these positions, and cut
    ``samples.jsonl`` back to its size at the checkpoint when the run trains on from it: it samples
    and logs the rest again (every sample row is written inside a training step, before the
    batch's checkpoint). Validating, testing or predicting from a checkpoint leaves the file alone."""
    for lg in _resumable(trainer):
        rows = (positions or {}).get(os.path.abspath(lg.log_dir))
        if rows is not None:
            lg.resume(rows)
    samples = samples_file(trainer)
    size = (positions or {}).get(os.path.abspath(samples))
    if trainer.state.fn != TrainerFn.FITTING:  # validate/test/predict from a checkpoint log no samples
        return
    if trainer.is_global_zero and size is not None and samples.is_file() and samples.stat().st_size > size:
        with samples.open("r+b") as f:
            f.truncate(size)


def start_resumed_logs(trainer: L.Trainer, step: int) -> None:
    """Tell each resumed logger the step its first row has (call at the first batch)."""
    for lg in _resumable(trainer):
        lg.start_resumed(step)
