"""Learning-rate schedules injected through the CLI (``lr_scheduler: {class_path: ...}``)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosineLR(LambdaLR):
    """Linear warm-up from 0 to the base LR over ``warmup_steps``, then cosine decay to ``min_lr_ratio``.

    ``total_steps=-1`` means "the whole run": the system fills it in from
    ``trainer.estimated_stepping_batches`` when it builds the scheduler. ``warmup_steps``
    below 1 is read as a fraction of the total.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: float = 0,
        total_steps: int = -1,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ):
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, self._factor, last_epoch=last_epoch)

    def set_total_steps(self, total_steps: int) -> None:
        """Fix the schedule's length and re-apply the current step's factor."""
        self.total_steps = int(total_steps)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base_lr * self._factor(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]  # what get_last_lr() reports

    def _factor(self, step: int) -> float:
        total = self.total_steps if self.total_steps > 0 else None
        if 0 < self.warmup_steps < 1 and total is None:
            return 1.0  # a fractional warm-up waits for set_total_steps
        # A fractional warm-up covers whole steps, so its last step reaches the base lr and never passes it.
        warmup = math.ceil(self.warmup_steps * total) if 0 < self.warmup_steps < 1 else self.warmup_steps
        if warmup and step < warmup:
            return (step + 1) / warmup
        if total is None:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1.0, total - warmup))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimization(module, params, optimizer_factory, scheduler_factory):
    """The ``configure_optimizers`` return value shared by every system.

    Args:
        module: the LightningModule (its trainer gives the total number of steps).
        params: the parameters to optimise (frozen models are never among them).
        optimizer_factory: ``params -> Optimizer`` (a class or a CLI-injected callable).
        scheduler_factory: ``optimizer -> LRScheduler`` or None; stepped every optimizer step.
    """
    optimizer = optimizer_factory(params)
    if scheduler_factory is None:
        return optimizer
    scheduler = scheduler_factory(optimizer)
    if isinstance(scheduler, WarmupCosineLR) and scheduler.total_steps <= 0 and module._trainer is not None:
        total = module.trainer.estimated_stepping_batches
        if math.isfinite(total):  # an endless run (max_steps=-1, max_epochs=-1) keeps the base lr after warm-up
            scheduler.set_total_steps(total)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
