"""Exact resume: a run killed after a checkpoint and resumed from ``last.ckpt`` in a fresh
Trainer logs, from the resume on, the very metrics of the uninterrupted run (bit for bit)
and ends with the very same weights; its metrics.csv (and samples.jsonl) holds every step once."""

from __future__ import annotations

import csv
import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import Logger

from rlhf_lightning.callbacks import ModelCheckpoint
from rlhf_lightning.data.datamodules import PreferenceDataModule, SFTDataModule
from rlhf_lightning.data.samplers import EpochShuffleSampler, ResumableDataLoader
from rlhf_lightning.loggers import ResumableCSVLogger
from rlhf_lightning.systems.dpo import DPOModule
from rlhf_lightning.systems.reward import RewardModule
from rlhf_lightning.systems.sft import SFTModule

TIMING = ("time", "per_sec", "throughput")


class Killed(RuntimeError):
    """Stands for a SIGKILL: the run stops with nothing saved on the way out."""


class Kill(L.Callback):
    """Kill the run as the batch after optimizer step ``at_step`` starts (its checkpoint is written),
    or, with ``mid_batch``, just before that batch's optimizer step (its forward and backward done)."""

    def __init__(self, at_step: int, mid_batch: bool = False):
        self.at_step, self.mid_batch = at_step, mid_batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step and not self.mid_batch:
            raise Killed(f"killed at step {self.at_step}")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.at_step and self.mid_batch:
            raise Killed(f"crashed in step {self.at_step}")


class Memory(Logger):
    """Every ``log_metrics`` call as ``(step, {name: value})``, timing metrics left out."""

    def __init__(self):
        super().__init__()
        self.rows = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        kept = {k: float(v) for k, v in metrics.items() if not any(t in k for t in TIMING)}
        self.rows.append((step, kept))


def run(make_module, make_data, root, *, kill_at=None, mid_batch=False, resume=False, callbacks=(), crash=None,
        **trainer_kw):  # fmt: skip
    """Fit in a fresh Trainer; returns (module, in-memory rows). Checkpoints go to ``root/ckpt``.
    ``crash``: a callback that raises :class:`Killed` somewhere, in place of ``Kill(kill_at)``."""
    L.seed_everything(0)
    module, memory = make_module(), Memory()
    ckpt_kw = trainer_kw.pop("ckpt", {"every_n_train_steps": 1})
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=1, **ckpt_kw)
    killer = crash if crash is not None else Kill(kill_at, mid_batch) if kill_at is not None else None
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=[memory, ResumableCSVLogger(str(root), name="logs", version="")],
        callbacks=[*callbacks, ckpt, *([killer] if killer is not None else [])],
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        default_root_dir=str(root),
        **trainer_kw,
    )
    ckpt_path = str(root / "ckpt" / "last.ckpt") if resume else None
    if killer is not None:
        with pytest.raises(Killed):
            trainer.fit(module, datamodule=make_data(), ckpt_path=ckpt_path)
    else:
        trainer.fit(module, datamodule=make_data(), ckpt_path=ckpt_path)
    return module, memory.rows


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in rows]


def kill_and_resume(
    make_module, make_data, tmp_path, kill_at, mid_batch=False, redone=0, crash=None, check_cut=None, **trainer_kw
):
    """Run uninterrupted, then killed at ``kill_at`` (or by the ``crash`` callback) and resumed;
    assert everything matches.

    ``redone``: rows the killed run logged after its last checkpoint, which the resumed run logs again.
    ``check_cut``: called with the killed run's ``last.ckpt`` contents, before the resume.
    """
    whole, whole_rows = run(make_module, make_data, tmp_path / "whole", **trainer_kw)
    _, first_rows = run(make_module, make_data, tmp_path / "cut", kill_at=kill_at, mid_batch=mid_batch, crash=crash,
                        **trainer_kw)  # fmt: skip
    assert (tmp_path / "cut/ckpt/last.ckpt").exists()
    if check_cut is not None:
        check_cut(torch.load(tmp_path / "cut/ckpt/last.ckpt", weights_only=False))
    resumed, resumed_rows = run(make_module, make_data, tmp_path / "cut", resume=True, **trainer_kw)
    # The killed run logged every row up to the kill; the resumed run logs exactly the rest.
    k = len(whole_rows) - len(resumed_rows)
    assert resumed_rows == whole_rows[k:] and 0 < k < len(whole_rows)
    assert first_rows[:k] == whole_rows[:k] and len(first_rows) - k == redone
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # metrics.csv: every row once, equal to the uninterrupted run's.
    cut_csv = read_csv(tmp_path / "cut/logs/metrics.csv")
    assert cut_csv == read_csv(tmp_path / "whole/logs/metrics.csv")
    # samples.jsonl (online RL; in default_root_dir, as the first logger here keeps no files):
    # every sample row once, equal to the uninterrupted run's.
    whole_samples = tmp_path / "whole/samples.jsonl"
    if whole_samples.exists():
        assert (tmp_path / "cut/samples.jsonl").read_text() == whole_samples.read_text()
    return whole_rows


# ----------------------------------------------------------------------------- SFT
def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture()
def sft_setup(tokenizer_dir, tiny_config, tmp_path):
    words = ["great", "bad", "fine", "slow", "lovely", "dull", "weak", "fun"]
    records = [
        {"prompt": f"The movie {i} was", "response": f" {words[i % 8]} and {words[(i * 3) % 8]}."} for i in range(22)
    ]
    train_file = write_jsonl(tmp_path / "sft.jsonl", records)
    # Dropout on: the resumed run must draw the same masks from the restored RNG.
    config = {**tiny_config, "attention_dropout": 0.1}

    def make_module():
        return SFTModule(model_config=config, tokenizer=tokenizer_dir)

    def make_data():
        return SFTDataModule(tokenizer=tokenizer_dir, train_file=train_file, val_fraction=0.2, batch_size=4, seed=3)

    return make_module, make_data


def test_sft_killed_mid_epoch_resumes_exactly(sft_setup, tmp_path):
    # 18 training examples: 5 batches an epoch; killed in epoch 1 after step 7, validation every 2 batches.
    rows = kill_and_resume(*sft_setup, tmp_path, kill_at=7, max_epochs=2, val_check_interval=2)
    assert any("val/sft/loss" in m for _, m in rows)


def test_sft_killed_at_an_epoch_boundary_resumes_exactly(sft_setup, tmp_path):
    # Step 5 ends epoch 0: the resumed run must draw epoch 1's order, not epoch 0's again.
    kill_and_resume(*sft_setup, tmp_path, kill_at=5, max_epochs=3, limit_val_batches=0)


def test_sft_epoch_end_checkpoint_resumes_exactly(sft_setup, tmp_path):
    # Checkpoints written only at the end of each epoch (ModelCheckpoint's on_train_epoch_end).
    ckpt = {"every_n_epochs": 1, "save_on_train_epoch_end": True}
    kill_and_resume(*sft_setup, tmp_path, kill_at=5, max_epochs=2, limit_val_batches=0, ckpt=ckpt)


def test_sft_killed_steps_after_its_checkpoint_resumes_exactly(sft_setup, tmp_path):
    # Checkpoints every 3 steps, killed after step 8: the six rows of steps 6 and 7 (training,
    # learning rate, validation) are in metrics.csv, dropped on resume and logged again.
    ckpt = {"every_n_train_steps": 3}
    callbacks = [LearningRateMonitor(logging_interval="step")]
    kwargs = dict(max_epochs=2, val_check_interval=2, ckpt=ckpt, callbacks=callbacks)
    rows = kill_and_resume(*sft_setup, tmp_path, kill_at=8, redone=6, **kwargs)
    assert any("lr-AdamW" in m for _, m in rows)


def test_sft_crashed_mid_batch_resumes_from_the_exception_checkpoint(sft_setup, tmp_path):
    # The checkpoint is the one written on the exception, after the batch's dropout draws:
    # the batch is done again from the RNG streams and log position of its start.
    ckpt = {"every_n_train_steps": 100, "save_on_exception": True}
    kill_and_resume(*sft_setup, tmp_path, kill_at=3, mid_batch=True, max_epochs=2, val_check_interval=2, ckpt=ckpt)


class CrashInsideWindow(L.Callback):
    """Raise in the backward of the second micro-batch of the accumulation window that ends at
    optimizer step ``at_step + 1``: the first micro-batch's gradients are pending."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_before_backward(self, trainer, pl_module, loss):
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        if trainer.global_step == self.at_step and done % trainer.accumulate_grad_batches == 1:
            raise Killed(f"crashed inside the window of step {self.at_step + 1}")


def test_sft_crashed_inside_an_accumulation_window_resumes_from_the_last_checkpoint(sft_setup, tmp_path):
    # A checkpoint holds no gradients: one written mid-window would lose the window's first
    # micro-batch. None is written (a warning says so); last.ckpt stays step 1's.
    def check_cut(state):
        assert not state["mid_batch"] and state["global_step"] == 1

    ckpt = {"every_n_train_steps": 1, "save_on_exception": True}
    with pytest.warns(UserWarning, match="no checkpoint written for it"):
        kill_and_resume(*sft_setup, tmp_path, kill_at=None, crash=CrashInsideWindow(1), check_cut=check_cut,
                        max_epochs=2, limit_val_batches=0, accumulate_grad_batches=2, ckpt=ckpt)  # fmt: skip


# ----------------------------------------------------------------------------- DPO and reward
@pytest.fixture()
def pairs_setup(tokenizer_dir, tiny_config, tmp_path):
    from rlhf_lightning.models import load_causal_lm, load_tokenizer, save_hf

    torch.manual_seed(0)
    tok = load_tokenizer(tokenizer_dir)
    save_hf(load_causal_lm(None, tok, model_config=dict(tiny_config)), tok, tmp_path / "sft")
    words = ["great", "bad", "fine", "slow", "lovely", "dull"]
    pairs = [
        {"prompt": f"Review {i}:", "chosen": f" {words[i % 6]} film.", "rejected": f" {words[(i + 2) % 6]} plot."}
        for i in range(12)
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)

    def make_data(group_by_length=False):
        return PreferenceDataModule(
            tokenizer=tokenizer_dir, train_file=data, val_fraction=0.0, batch_size=2, group_by_length=group_by_length
        )

    return str(tmp_path / "sft"), make_data


def test_dpo_killed_mid_epoch_resumes_exactly(tokenizer_dir, pairs_setup, tmp_path):
    sft, make_data = pairs_setup

    def make_module():
        return DPOModule(model=sft, tokenizer=tokenizer_dir)

    kill_and_resume(make_module, make_data, tmp_path / "run", kill_at=4, max_epochs=2, limit_val_batches=0)


def test_reward_with_length_grouped_batches_killed_at_an_epoch_boundary_resumes_exactly(
    tokenizer_dir, pairs_setup, tmp_path
):
    sft, make_data = pairs_setup

    def make_module():
        return RewardModule(model=sft, tokenizer=tokenizer_dir, disable_dropout=False)

    kill_and_resume(
        make_module,
        lambda: make_data(group_by_length=True),
        tmp_path / "run",
        kill_at=6,
        max_epochs=2,
        limit_val_batches=0,
    )


# ----------------------------------------------------------------------------- the pieces
def test_epoch_order_is_a_function_of_seed_and_epoch():
    a, b = EpochShuffleSampler(10, seed=1), EpochShuffleSampler(10, seed=1)
    a.set_epoch(0)
    first = list(a)
    a.set_epoch(1)
    second = list(a)
    b.set_epoch(1)
    assert list(b) == second != first  # no matter how many epochs the sampler ran before
    assert sorted(second) == list(range(10))


def test_loader_skips_the_batches_a_checkpoint_had_trained_on():
    sampler = EpochShuffleSampler(10, seed=0)
    loader = ResumableDataLoader(list(range(10)), batch_size=3, sampler=sampler, progress=lambda: (1, 2))
    assert loader.state_dict() == {"epoch": 1, "batches": 2}
    sampler.set_epoch(1)
    whole = [b.tolist() for b in loader]
    fresh = ResumableDataLoader(list(range(10)), batch_size=3, sampler=EpochShuffleSampler(10, seed=0))
    fresh.load_state_dict({"epoch": 1, "batches": 2})
    assert [b.tolist() for b in fresh] == whole[2:]
    assert [b.tolist() for b in fresh] == whole  # the skip applies to one pass only
    # Saved at the end of an epoch: the next epoch from its start.
    done = ResumableDataLoader(list(range(10)), batch_size=3, sampler=sampler, progress=lambda: (1, 4))
    assert done.state_dict() == {"epoch": 2, "batches": 0}


def test_fresh_run_sets_an_old_metrics_file_aside(tmp_path):
    for i in range(3):
        logger = ResumableCSVLogger(str(tmp_path), name="logs", version="")
        logger.log_metrics({"loss": float(i)}, step=0)
        logger.finalize("success")
    names = sorted(p.name for p in (tmp_path / "logs").iterdir() if p.name.startswith("metrics"))
    assert names == ["metrics.csv", "metrics.csv.1", "metrics.csv.2"]
    assert read_csv(tmp_path / "logs/metrics.csv.2") == [{"loss": "0.0", "step": "0"}]  # the oldest
    assert read_csv(tmp_path / "logs/metrics.csv") == [{"loss": "2.0", "step": "0"}]


# ----------------------------------------------------------------------------- the pipeline
def test_pipeline_resume_gives_the_uninterrupted_sft_stage(tmp_path, monkeypatch):
    """``pipeline --resume`` after a crash in SFT: the same export and the same metrics.csv."""
    from safetensors.torch import load_file

    from rlhf_lightning.cli import cli_main
    from tests.test_pipeline import pipeline_args

    def args(run_dir):
        out = pipeline_args(run_dir, sft_steps=6) + ["--only=[data, sft]"]
        return [
            a.replace('"trainer.max_steps": 6', '"trainer.max_steps": 6, "trainer.log_every_n_steps": 1') for a in out
        ]

    cli_main(args(tmp_path / "whole"))
    original_step = SFTModule.training_step

    def crash_at_step_3(self, batch, batch_idx):
        if self.global_step == 3:
            raise Killed("simulated crash")
        return original_step(self, batch, batch_idx)

    monkeypatch.setattr(SFTModule, "training_step", crash_at_step_3)
    with pytest.raises(Killed):
        cli_main(args(tmp_path / "cut"))
    monkeypatch.setattr(SFTModule, "training_step", original_step)
    cli_main(args(tmp_path / "cut") + ["--resume=true"])

    whole, cut = (load_file(tmp_path / run / "sft/hf/model.safetensors") for run in ("whole", "cut"))
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)
    rows = read_csv(tmp_path / "cut/sft/logs/metrics.csv")
    assert rows == read_csv(tmp_path / "whole/sft/logs/metrics.csv")
    assert [r["step"] for r in rows if r.get("sft/loss")] == [str(s) for s in range(6)]


def test_samples_file_is_cut_back_only_when_training_resumes(tmp_path):
    """A checkpoint holds samples.jsonl's size; training on from it drops the rows written after
    it (the resumed run writes them again), validating or predicting from it keeps every row."""
    from lightning.pytorch.trainer.states import TrainerFn

    from rlhf_lightning.loggers import log_positions, resume_logs

    trainer = L.Trainer(default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False)
    samples = tmp_path / "samples.jsonl"
    samples.write_text('{"step": 0}\n')
    positions = log_positions(trainer)
    samples.write_text('{"step": 0}\n{"step": 4}\n')
    for fn in (TrainerFn.VALIDATING, TrainerFn.PREDICTING):
        trainer.state.fn = fn
        resume_logs(trainer, positions)
        assert samples.read_text() == '{"step": 0}\n{"step": 4}\n'
    trainer.state.fn = TrainerFn.FITTING
    resume_logs(trainer, positions)
    assert samples.read_text() == '{"step": 0}\n'
