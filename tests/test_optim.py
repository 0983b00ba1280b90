"""WarmupCosineLR and build_optimization against hand-derived learning rates.

Conventions of the schedule (rlhf_lightning/optim.py), with ``s`` the scheduler's step
(``last_epoch``: 0 at construction, +1 per ``scheduler.step()``, i.e. per optimizer step):

    warm-up, s < W:  f(s) = (s + 1) / W
    then:            p = min(1, (s - W) / max(1, T - W))
                     f(s) = m + (1 - m) * 0.5 * (1 + cos(pi * p))

with W the warm-up steps (``W * T`` when W < 1), T the total steps and m ``min_lr_ratio``.
The learning rate is ``base_lr * f(s)``; every test uses base_lr 1.0, so lr = f(s).
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from rlhf_lightning.optim import WarmupCosineLR, build_optimization
from tests.conftest import quiet_trainer

C4 = math.cos(math.pi / 4)  # 0.70711
C6 = math.cos(math.pi / 6)  # 0.86603

# base lr 1, W = 2, T = 6, m = 0.1 (cosine part: p = (s - 2) / 4, 0.1 + 0.45 * (1 + cos(pi p)))
WARMUP2_TOTAL6 = [
    0.5,  # s=0: (0 + 1) / 2
    1.0,  # s=1: (1 + 1) / 2
    1.0,  # s=2: p = 0    -> 0.1 + 0.45 * 2
    0.1 + 0.45 * (1 + C4),  # s=3: p = 1/4 -> 0.86820
    0.55,  # s=4: p = 1/2 -> 0.1 + 0.45 * (1 + 0)
    0.1 + 0.45 * (1 - C4),  # s=5: p = 3/4 -> 0.23180
    0.1,  # s=6: p = 1    -> 0.1 + 0.45 * (1 - 1)
    0.1,  # s=7: p = min(1, 5/4) = 1: stays at the floor
]

# base lr 1, W = 0.25 * 8 = 2 steps, T = 8, m = 0 (p = (s - 2) / 6, 0.5 * (1 + cos(pi p)))
QUARTER_OF_8 = [
    0.5,  # s=0: 1 / 2
    1.0,  # s=1: 2 / 2
    1.0,  # s=2: p = 0
    0.5 * (1 + C6),  # s=3: p = 1/6 -> 0.93301
    0.75,  # s=4: p = 2/6 -> 0.5 * (1 + 0.5)
    0.5,  # s=5: p = 3/6 -> 0.5 * (1 + 0)
    0.25,  # s=6: p = 4/6 -> 0.5 * (1 - 0.5)
    0.5 * (1 - C6),  # s=7: p = 5/6 -> 0.06699
    0.0,  # s=8: p = 1
]


def _optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _lrs(scheduler: WarmupCosineLR, n: int) -> list[float]:
    """The lr at steps 0..n-1: read, then one optimizer step and one scheduler step."""
    out = []
    for _ in range(n):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()  # no gradients: a no-op, but keeps torch's step-order check quiet
        scheduler.step()
    return out


def test_warmup_then_cosine_to_min_ratio():
    scheduler = WarmupCosineLR(_optimizer(), warmup_steps=2, total_steps=6, min_lr_ratio=0.1)
    assert _lrs(scheduler, 8) == pytest.approx(WARMUP2_TOTAL6)


def test_base_lr_scales_the_factor():
    scheduler = WarmupCosineLR(_optimizer(lr=3e-4), warmup_steps=2, total_steps=6, min_lr_ratio=0.1)
    assert _lrs(scheduler, 8) == pytest.approx([3e-4 * f for f in WARMUP2_TOTAL6])


def test_fractional_warmup_is_a_share_of_the_total():
    scheduler = WarmupCosineLR(_optimizer(), warmup_steps=0.25, total_steps=8)
    assert _lrs(scheduler, 9) == pytest.approx(QUARTER_OF_8)
    # ... the same schedule as two whole warm-up steps.
    whole = WarmupCosineLR(_optimizer(), warmup_steps=2, total_steps=8)
    assert _lrs(whole, 9) == pytest.approx(QUARTER_OF_8)


def test_no_warmup_starts_at_the_peak():
    # W = 0: s=0 is p = 0 -> 1.0; T = 4, m = 0: s=2 is p = 1/2 -> 0.5; s=4 is p = 1 -> 0.
    scheduler = WarmupCosineLR(_optimizer(), warmup_steps=0, total_steps=4)
    assert _lrs(scheduler, 5) == pytest.approx([1.0, 0.5 * (1 + C4), 0.5, 0.5 * (1 - C4), 0.0])


@pytest.mark.parametrize(
    ("share", "total"),
    [
        (0.1, 25),  # 2.5 steps: before the fix s=2 got 3/2.5 = 1.2; now W = ceil(2.5) = 3
        (0.05, 1),  # sft.yaml's share under fast_dev_run: before, s=0 got 1/0.05 = 20 x the base lr
    ],
)
def test_fractional_warmup_never_exceeds_the_base_lr(share, total):
    scheduler = WarmupCosineLR(_optimizer(), warmup_steps=share, total_steps=total, min_lr_ratio=0.1)
    assert max(_lrs(scheduler, total)) <= 1.0 + 1e-12


def test_fractional_warmup_rounds_up_to_whole_steps():
    # 0.1 of 25 = 2.5 -> W = 3 steps: s=0 -> 1/3, s=1 -> 2/3, s=2 -> 3/3 = 1 (the peak), then cosine
    # over the 22 remaining steps: s=3 -> p = 0, the factor is exactly 1 again.
    scheduler = WarmupCosineLR(_optimizer(), warmup_steps=0.1, total_steps=25)
    assert _lrs(scheduler, 4) == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])


def test_total_steps_filled_later():
    # total_steps=-1 with a whole-step warm-up: the warm-up runs, then the lr holds at the base.
    scheduler = WarmupCosineLR(_optimizer(), warmup_steps=2, total_steps=-1, min_lr_ratio=0.1)
    assert _lrs(scheduler, 4) == pytest.approx([0.5, 1.0, 1.0, 1.0])

    # Set at construction (what build_optimization does): exactly the schedule of total_steps=6.
    scheduler = WarmupCosineLR(_optimizer(), warmup_steps=2, total_steps=-1, min_lr_ratio=0.1)
    scheduler.set_total_steps(6)
    assert scheduler.total_steps == 6
    assert _lrs(scheduler, 8) == pytest.approx(WARMUP2_TOTAL6)


def test_fractional_warmup_waits_for_the_total():
    # A share of an unknown total: factor 1 until the total is known ...
    scheduler = WarmupCosineLR(_optimizer(), warmup_steps=0.25, total_steps=-1)
    assert scheduler.optimizer.param_groups[0]["lr"] == 1.0
    # ... then set_total_steps re-applies the factor of the current step (s=0: 1 / 2).
    scheduler.set_total_steps(8)
    assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(0.5)
    assert _lrs(scheduler, 9) == pytest.approx(QUARTER_OF_8)


def test_set_total_steps_updates_get_last_lr():
    scheduler = WarmupCosineLR(_optimizer(), warmup_steps=0.25, total_steps=-1)
    scheduler.set_total_steps(8)
    assert scheduler.get_last_lr() == pytest.approx([0.5])  # s=0: 1 / 2, as param_groups[0]["lr"]


def test_state_dict_resumes_the_same_schedule():
    # Three steps, save, load into a fresh scheduler (total -1, as configure_optimizers builds it
    # before Lightning restores the state): the remaining lrs are WARMUP2_TOTAL6[3:].
    scheduler = WarmupCosineLR(_optimizer(), warmup_steps=2, total_steps=6, min_lr_ratio=0.1)
    _lrs(scheduler, 3)
    state = scheduler.state_dict()
    resumed = WarmupCosineLR(_optimizer(), warmup_steps=2, total_steps=-1, min_lr_ratio=0.1)
    resumed.load_state_dict(state)
    assert resumed.total_steps == 6 and resumed.last_epoch == 3
    resumed.step()  # as Lightning's next optimizer step would ... recompute the lr from the restored step
    assert resumed.last_epoch == 4
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(WARMUP2_TOTAL6[4])


class _Tiny(L.LightningModule):
    """One weight, constant gradient; records the lr of every optimizer step."""

    def __init__(self, scheduler_factory):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.scheduler_factory = scheduler_factory
        self.step_lrs: list[float] = []

    def training_step(self, batch, batch_idx):
        return (self.w * batch).sum()

    def configure_optimizers(self):
        return build_optimization(self, [self.w], lambda p: torch.optim.SGD(p, lr=1.0), self.scheduler_factory)

    def on_before_optimizer_step(self, optimizer):
        self.step_lrs.append(optimizer.param_groups[0]["lr"])


def _quarter_warmup(optimizer):
    return WarmupCosineLR(optimizer, warmup_steps=0.25, total_steps=-1)


def _loader(n: int) -> DataLoader:
    return DataLoader(torch.ones(n, 1), batch_size=1)


def test_build_optimization_fills_total_from_max_steps(tmp_path):
    # max_steps=8 over 20 batches: estimated_stepping_batches = 8 -> QUARTER_OF_8's first 8 steps.
    module = _Tiny(_quarter_warmup)
    trainer = quiet_trainer(tmp_path, max_steps=8)
    trainer.fit(module, _loader(20))
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert trainer.lr_scheduler_configs[0].interval == "step"
    assert scheduler.total_steps == 8
    assert module.step_lrs == pytest.approx(QUARTER_OF_8[:8])


def test_build_optimization_steps_per_optimizer_step_not_per_batch(tmp_path):
    # One epoch of 16 batches, 2 batches per optimizer step: 8 optimizer steps, the same schedule
    # as above; a scheduler stepped per batch would be twice as far along.
    module = _Tiny(_quarter_warmup)
    trainer = quiet_trainer(tmp_path, max_epochs=1, accumulate_grad_batches=2)
    trainer.fit(module, _loader(16))
    assert trainer.lr_scheduler_configs[0].scheduler.total_steps == 8
    assert module.step_lrs == pytest.approx(QUARTER_OF_8[:8])


def test_build_optimization_without_trainer_or_scheduler():
    module = _Tiny(_quarter_warmup)  # not attached to a Trainer: the total stays unknown
    config = module.configure_optimizers()
    assert config["lr_scheduler"]["interval"] == "step"
    assert config["lr_scheduler"]["scheduler"].total_steps == -1
    # An explicit total is kept; no scheduler returns the bare optimizer.
    explicit = build_optimization(
        module,
        [module.w],
        lambda p: torch.optim.SGD(p, lr=1.0),
        lambda o: WarmupCosineLR(o, warmup_steps=2, total_steps=6),
    )
    assert explicit["lr_scheduler"]["scheduler"].total_steps == 6
    bare = build_optimization(module, [module.w], lambda p: torch.optim.SGD(p, lr=1.0), None)
    assert isinstance(bare, torch.optim.SGD)
