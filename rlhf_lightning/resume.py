"""Exact resume: what a checkpoint carries beyond weights, optimizer and Lightning's loop counters.

:class:`ExactResume` is mixed into every system (``systems/base.py``). Each checkpoint
gets, besides what Lightning writes:

* ``rng_states``: every rank's RNG streams (``rng.py``), restored as training starts (after
  the sanity check and the loaders' set-up, which a resumed run does and an uninterrupted
  one did long before);
* ``log_rows``: where each :class:`~rlhf_lightning.loggers.ResumableCSVLogger` file
  continues;
* ``wandb_run_ids``: the id of each ``WandbLogger``'s run; ``rlhf-lightning fit --ckpt_path``
  gives them back to the loggers the config names (:func:`continue_wandb_runs`), so the
  resumed run logs on to the same W&B run (Lightning's logger resumes a run it is given the
  id of). Steps after the checkpoint that the interrupted run had logged are logged again
  with the same values, since the resume is exact;
* ``mid_batch``: whether it was written in the middle of a batch (on an exception, by
  ``ModelCheckpoint(save_on_exception=True)``). The resumed run does that batch again, so
  such a checkpoint holds the RNG streams and log position of the batch's start, and
  Lightning's logging step, which a restart counts one too far for such a checkpoint, is
  set back. That is exact only while the batch has not changed the weights nor left
  gradients to accumulate (:meth:`ExactResume.exactly_resumable_now`); past that point
  ``rlhf_lightning.callbacks.ModelCheckpoint`` writes nothing on the exception and the last
  checkpoint stays the one to resume from.

The position in the data is the training loader's (``data/samplers.ResumableDataLoader``);
the online-RL state (KL controller, iteration, rollout buffer) is the system's own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from rlhf_lightning.loggers import flush_logs, log_positions, resume_logs, start_resumed_logs
from rlhf_lightning.rng import gather_ranks, rng_state, set_rng_state


def _mid_batch(trainer: L.Trainer) -> bool:
    """Whether a batch has been drawn and not yet trained on (a save on an exception)."""
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    return trainer.training and progress.ready > progress.processed


def _is_wandb(logger: Any) -> bool:
    from lightning.pytorch.loggers import WandbLogger  # does not import wandb

    return isinstance(logger, WandbLogger)


def _is_wandb_class(class_path: Any) -> bool:
    """Whether a config's ``class_path`` names ``WandbLogger`` or a subclass (as :func:`_is_wandb`)."""
    import importlib

    from lightning.pytorch.loggers import WandbLogger

    if not isinstance(class_path, str) or "." not in class_path:
        return False
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return False
    return isinstance(cls, type) and issubclass(cls, WandbLogger)


def checkpoint_extras(ckpt_path: str | Path) -> dict[str, Any]:
    """A checkpoint's contents without reading its weights (memory-mapped), or of a sharded
    checkpoint's ``meta.pt``; ``{}`` when there is no such file (``last``, a hub path, ...)."""
    path = Path(ckpt_path)
    if path.is_dir():  # FSDP2/ModelParallelStrategy: weights in shards, the rest in meta.pt
        path = path / "meta.pt"
    if not path.is_file():
        return {}
    # weights_only, as Lightning loads it; mmap needs torch's zip format (a legacy file: without)
    for mmap in (True, False):
        try:
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
        except Exception as err:  # best effort: Lightning reports a checkpoint it cannot load
            error = err
    rank_zero_warn(f"could not read {path} for its W&B run ids ({type(error).__name__}: {error})")
    return {}


def continue_wandb_runs(trainer_config: Any, ckpt_path: str | Path) -> list[Any]:
    """Give each ``WandbLogger`` in ``trainer_config.logger`` (a parsed config, before the
    loggers are built) the id of the run it logged to when ``ckpt_path`` was written, unless
    the config sets one (``id`` or ``version``). Returns the init-args namespaces it set,
    so that the caller can take the ids out again once the loggers exist."""
    ids = list(checkpoint_extras(ckpt_path).get("wandb_run_ids") or [])
    loggers = trainer_config.get("logger")
    loggers = loggers if isinstance(loggers, list) else [loggers]
    given = []
    for logger in loggers:
        if not ids or not _is_wandb_class(getattr(logger, "class_path", None)):
            continue
        run_id = ids.pop(0)  # in logger order, as on_save_checkpoint stored them
        init = logger.init_args
        if init.get("id") is None and init.get("version") is None and run_id:
            init["id"] = run_id
            given.append(init)
    return given


def finish_wandb_runs(trainer: L.Trainer) -> None:
    """End the W&B run of each of ``trainer``'s ``WandbLogger`` that started one."""
    for logger in trainer.loggers:
        if _is_wandb(logger) and logger._experiment is not None and hasattr(logger._experiment, "finish"):
            logger._experiment.finish()


class ExactResume:
    """LightningModule hooks that make a run resumed from a checkpoint continue the very same run."""

    _rng_to_restore: list[dict[str, Any]] | None = None
    _step_after_batch: int | None = None  # optimizer steps taken as the last batch ended
    _rng_after_batch: dict[str, Any] | None = None  # this rank's streams as the last batch ended
    _log_rows_after_batch: dict[str, int] | None = None
    _logs_resumed = False

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        trainer = self._trainer
        mid_batch = trainer is not None and _mid_batch(trainer)
        checkpoint["mid_batch"] = mid_batch
        local = self._rng_after_batch if mid_batch and self._rng_after_batch is not None else rng_state()
        checkpoint["rng_states"] = gather_ranks(local)  # one per rank
        if trainer is not None:
            flush_logs(trainer)
            rows = self._log_rows_after_batch if mid_batch else None
            checkpoint["log_rows"] = rows if rows is not None else log_positions(trainer)
            ids = [lg.version for lg in trainer.loggers if _is_wandb(lg)]
            if ids:
                checkpoint["wandb_run_ids"] = ids

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._rng_to_restore = checkpoint.get("rng_states")
        trainer = self._trainer
        if trainer is None:
            return
        if "log_rows" in checkpoint:
            resume_logs(trainer, checkpoint["log_rows"])
            self._logs_resumed = True
        if checkpoint.get("mid_batch"):
            # Lightning's restart adds one to the logging step, as for a checkpoint written at
            # a batch's end; here the interrupted batch is done again under its own step.
            loop = checkpoint.get("loops", {}).get("fit_loop", {})
            state = loop.get("epoch_loop.state_dict", {})
            done = loop.get("epoch_loop.batch_progress", {}).get("current", {}).get("completed", 0)
            if "_batches_that_stepped" in state and done % trainer.accumulate_grad_batches == 0:
                state["_batches_that_stepped"] -= 1

    def on_train_start(self) -> None:
        """Take up this rank's RNG streams where the checkpoint left them.

        Here rather than at loading: Lightning loads a checkpoint before the sanity check,
        the building of the loaders and the ``on_train_start`` of callbacks, whatever they
        draw; from here on a resumed run draws exactly what the uninterrupted one drew after
        the checkpoint was written.
        """
        super().on_train_start()
        states, self._rng_to_restore = self._rng_to_restore, None
        if states and len(states) == self.trainer.world_size:
            set_rng_state(states[self.global_rank])
        elif states:
            rank_zero_warn(
                f"the checkpoint holds the RNG streams of {len(states)} ranks, this run has "
                f"{self.trainer.world_size}: they are not restored, so the run is not continued exactly"
            )
        self._mark_batch_end()

    def exactly_resumable_now(self) -> bool:
        """Whether a checkpoint written now continues the run exactly: between batches, or in a
        batch that has taken no optimizer step yet and starts an accumulation window (a
        checkpoint holds no gradients, so a window's earlier micro-batches would be lost).

        An exception inside ``optimizer.step`` itself, once some weights have moved, is not seen
        (the step is counted when it completes); one in ``on_before_optimizer_step`` (the
        non-finite guard's) is before any change.
        """
        trainer = self._trainer
        if trainer is None or not _mid_batch(trainer):
            return True
        if self._step_after_batch is not None and trainer.global_step != self._step_after_batch:
            return False
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        return not self.automatic_optimization or done % trainer.accumulate_grad_batches == 0

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        out = super().on_train_batch_start(batch, batch_idx)
        if self._logs_resumed:
            # The step Lightning logs this batch's metrics at (its LearningRateMonitor reads it so).
            start_resumed_logs(self.trainer, self.trainer.fit_loop.epoch_loop._batches_that_stepped)
            self._logs_resumed = False
        return out

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        self._mark_batch_end()

    def _mark_batch_end(self) -> None:
        """What a checkpoint written in the middle of the next batch holds: the state as it started.

        Taken as a batch ends (and as training starts), not in the next batch's
        ``on_train_batch_start``: Lightning counts the batch as started, and runs the
        callbacks' hook, before the module's, and an exception there must see this state.
        """
        self._rng_after_batch = rng_state()
        self._log_rows_after_batch = log_positions(self.trainer)
        self._step_after_batch = self.trainer.global_step
