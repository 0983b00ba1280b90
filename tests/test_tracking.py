"""Experiment tracking: Weights & Biases offline (no account) from the CLI, CSV hyperparameters."""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from rlhf_lightning.cli import cli_main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_wandb_offline_run_writes_run_files(demo_workspace, monkeypatch, tmp_path):
    monkeypatch.chdir(demo_workspace)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cli_main(
        [
            "fit",
            "-c",
            str(CONFIGS / "sft.yaml"),
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=1",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
            "--trainer.logger.offline=true",
            f"--trainer.logger.save_dir={tmp_path}",
            "--trainer.logger.project=rlhf-lightning-test",
            f"--trainer.callbacks.init_args.dirpath={tmp_path}/hf",
        ]
    )
    import wandb

    wandb.finish()  # what the end of the process does: flush the run's files
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    logs = list(runs[0].glob("run-*.wandb"))
    assert len(logs) == 1  # the run's event log, uploaded later by `wandb sync`
    deadline = time.monotonic() + 60  # the wandb service process writes the log asynchronously
    while (
        not all(k in (blob := logs[0].read_bytes()) for k in (b"model_config", b"sft/loss"))
        and time.monotonic() < deadline
    ):
        time.sleep(0.5)
    # Hyperparameters (model and data init arguments) and metrics are in the record stream.
    for key in (b"model_config", b"train_file", b"sft/loss"):
        assert key in blob, key


def test_csv_logger_records_hyperparameters(demo_workspace, monkeypatch, tmp_path):
    monkeypatch.chdir(demo_workspace)
    cli_main(
        [
            "fit",
            "-c",
            str(CONFIGS / "sft.yaml"),
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=1",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.callbacks.init_args.dirpath={tmp_path}/hf",
        ]
    )
    hparams = yaml.safe_load((demo_workspace / "runs/demo/sft/logs/hparams.yaml").read_text())
    assert hparams["model_config"]["num_hidden_layers"] == 4 and hparams["train_file"] == "data/demo/sft.jsonl"
    metrics = (demo_workspace / "runs/demo/sft/logs/metrics.csv").read_text().splitlines()[0].split(",")
    assert "sft/loss" in metrics and "val/sft/loss" in metrics
