"""Callbacks: Hugging Face export at the end of fit, checkpoints that resume exactly, the
non-finite guard, JSONL prediction writing, sample tables.

The training-time evaluation callback is :class:`rlhf_lightning.eval.GoldRewardEval`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from rlhf_lightning.loggers import samples_file
from rlhf_lightning.models.sharding import gathered_copy

log = logging.getLogger(__name__)


class HFExport(L.Callback):
    """Write the system's ``save_pretrained`` export (model + tokenizer, safetensors) when fit ends.

    Args:
        dirpath: where to write; default ``<trainer.default_root_dir>/hf``, the path the
            next stage's config reads.
    """

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath

    def export_path(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "hf"

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0:  # e.g. max_steps=0: the weights are the starting point, not a result
            rank_zero_warn(
                f"no optimizer step was taken, so nothing was exported (the export at {self.export_path(trainer)} "
                "is left as it is, and the pipeline does not count this stage as done)"
            )
            return
        trainer.strategy.barrier()
        # A sharded model (FSDP2) is gathered by every rank; rank 0 gets the full copy to write.
        model = gathered_copy(pl_module.export_model(), within=pl_module)
        if trainer.is_global_zero:
            path = pl_module.export_hf(self.export_path(trainer), model)
            log.info("exported %s to %s", type(pl_module).__name__, path)
        trainer.strategy.barrier()


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (same arguments), whose ``save_on_exception`` writes only a
    checkpoint the run can be resumed from exactly.

    An exception in the middle of a batch that has already updated the weights (an online-RL
    iteration part-way through its updates) or left gradients of an accumulation window would
    give a checkpoint whose resume does that batch again from the wrong weights. Then nothing is
    written, ``last.ckpt`` stays the last exact checkpoint, and a warning says so (the system
    decides: ``ExactResume.exactly_resumable_now``).
    """

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        exact = getattr(pl_module, "exactly_resumable_now", None)
        # Every rank decides alike (the save that follows is a collective): all must be exact.
        if (
            self.save_on_exception
            and exact is not None
            and not trainer.strategy.reduce_boolean_decision(exact(), all=True)
        ):
            rank_zero_warn(
                f"{type(exception).__name__} in the middle of a batch that had already updated the model: no "
                f"checkpoint written for it (it would not resume exactly); resume from {self.last_model_path or 'none'}"
            )
            return
        super().on_exception(trainer, pl_module, exception)


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient or weight."""


class NonFiniteGuard(L.Callback):
    """Stop (or skip the step) when a gradient norm or a logged loss is not finite.

    The check runs before every optimizer step, so a non-finite update never reaches the
    weights: the checkpoints written on the way out (``save_on_exception``) and the last
    periodic one hold finite weights. Under several ranks the decision is shared, so no
    rank is left waiting. ``rlhf-lightning fit`` always adds it (``--nonfinite.action``).

    Args:
        action: ``stop`` raises :class:`NonFiniteError` naming the step and the metric;
            ``skip`` drops the step's gradients (no update) and counts it in
            ``nonfinite/skipped_steps``.
    """

    def __init__(self, action: str = "stop"):
        if action not in ("stop", "skip"):
            raise ValueError(f"NonFiniteGuard action must be 'stop' or 'skip', got {action!r}")
        self.action = action
        self.skipped = 0

    @staticmethod
    def grad_norm(optimizer: torch.optim.Optimizer) -> torch.Tensor:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return torch.zeros(())
        return torch.linalg.vector_norm(torch.stack([g.detach().float().norm() for g in grads]))

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        norm = self.grad_norm(optimizer)
        bad = trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(norm)), all=False)
        if not bad:
            return
        where = f"step {trainer.global_step} (epoch {trainer.current_epoch})"
        if self.action == "stop":
            raise NonFiniteError(
                f"non-finite gradient norm ({float(norm)}) at {where}{self._losses(trainer)}; training stopped "
                "before the update, so the weights and checkpoints stay finite. Lower the learning rate or "
                "check the data; --nonfinite.action=skip skips such steps instead."
            )
        optimizer.zero_grad(set_to_none=True)  # no gradient: the optimizer leaves every weight as it is
        self.skipped += 1
        log.warning("skipped the update at %s: non-finite gradient norm (%d skipped so far)", where, self.skipped)
        pl_module.log("nonfinite/skipped_steps", float(self.skipped), on_step=True, batch_size=1)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self.action == "skip":
            return  # a non-finite loss gave non-finite gradients, whose step was skipped
        losses = self._losses(trainer)
        if losses:
            raise NonFiniteError(f"non-finite loss at step {trainer.global_step}{losses}; training stopped")

    @staticmethod
    def _losses(trainer: L.Trainer) -> str:
        bad = [
            f"{k}={float(v)}"
            for k, v in trainer.callback_metrics.items()
            if "loss" in k and isinstance(v, torch.Tensor) and v.numel() == 1 and not torch.isfinite(v)
        ]
        return f" (logged: {', '.join(bad)})" if bad else ""

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


class JsonlPredictionWriter(BasePredictionWriter):
    """Write ``predict`` outputs (lists of dicts) as JSON Lines, one record per sample.

    Under several ranks each rank writes ``<output>.rank<N>``; with one rank the file
    is ``output`` itself.
    """

    def __init__(self, output: str = "predictions.jsonl"):
        super().__init__(write_interval="epoch")
        self.output = output

    def write_on_epoch_end(self, trainer, pl_module, predictions: list[Any], batch_indices) -> None:
        path = Path(self.output)
        if trainer.world_size > 1:
            path = path.with_name(f"{path.name}.rank{trainer.global_rank}")
        path.parent.mkdir(parents=True, exist_ok=True)
        # One dataloader gives a list of batches (lists of dicts); several give one such list each.
        nested = (
            bool(predictions)
            and isinstance(predictions[0], list)
            and bool(predictions[0])
            and isinstance(predictions[0][0], list)
        )
        batches = [b for dl in predictions for b in dl] if nested else predictions
        with path.open("w") as f:
            for batch in batches:
                for record in batch:
                    f.write(json.dumps(record) + "\n")
        self._report(path, batches)

    @rank_zero_only
    def _report(self, path: Path, batches) -> None:
        n = sum(len(b) for b in batches)
        log.info("wrote %d predictions to %s", n, path)


def log_samples(trainer: L.Trainer, key: str, columns: list[str], rows: list[list[Any]]) -> None:
    """Log a table of samples to every logger that can show one, and always to ``samples.jsonl``.

    Weights & Biases gets a table, TensorBoard a markdown text; the JSONL file in the
    run directory works with any logger (or none).
    """
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if hasattr(logger, "log_text"):  # WandbLogger
            logger.log_text(key=key, columns=columns, data=rows, step=trainer.global_step)
        elif hasattr(getattr(logger, "experiment", None), "add_text"):  # TensorBoard
            header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
            body = "".join(
                "| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in row) + " |\n" for row in rows
            )
            logger.experiment.add_text(key, header + body, global_step=trainer.global_step)
    path = samples_file(trainer)  # cut back to a checkpoint's size when a run resumes from it
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            f.write(
                json.dumps({"key": key, "step": trainer.global_step, **dict(zip(columns, row, strict=True))}) + "\n"
            )
