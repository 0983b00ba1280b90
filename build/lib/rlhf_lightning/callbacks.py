"""Callbacks: Hugging Face export at the end of fit, and JSONL prediction writing."""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_only

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
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            path = pl_module.export_hf(self.export_path(trainer))
            log.info("exported %s to %s", type(pl_module).__name__, path)
        trainer.strategy.barrier()


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
        nested = bool(predictions) and isinstance(predictions[0], list) and bool(predictions[0]) and isinstance(predictions[0][0], list)
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


def load_callable(spec: str):
    """Import ``"package.module:function"`` (a gold reward, say) and return the function."""
    if ":" not in spec:
        raise ValueError(f"expected 'module:function', got {spec!r}")
    module_name, attr = spec.split(":", 1)
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError as e:
        raise ValueError(f"{module_name!r} has no attribute {attr!r}") from e


def log_samples(trainer: L.Trainer, key: str, columns: list[str], rows: list[list[Any]]) -> None:
    """Log a table of samples to every logger that can show one, and always to ``samples.jsonl``.

    Weights & Biases gets a table, TensorBoard a markdown text; the JSONL file in the
    run directory works with any logger (or none).
    """
    log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if hasattr(logger, "log_text"):  # WandbLogger
            logger.log_text(key=key, columns=columns, data=rows, step=trainer.global_step)
        elif hasattr(getattr(logger, "experiment", None), "add_text"):  # TensorBoard
            header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
            body = "".join("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in row) + " |\n" for row in rows)
            logger.experiment.add_text(key, header + body, global_step=trainer.global_step)
    path = Path(log_dir or trainer.default_root_dir) / "samples.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps({"key": key, "step": trainer.global_step, **dict(zip(columns, row))}) + "\n")


class GoldRewardEval(L.Callback):
    """Every ``every_n_steps`` PPO iterations, sample held-out prompts and log the ``eval/*`` metrics.

    ``eval/gold_reward`` (when a gold reward is given: any ``module:function`` taking
    ``(prompt, response)`` and returning a float), ``eval/proxy_reward`` (the reward
    model), ``eval/kl`` (Monte-Carlo KL to the reference over sampled responses),
    ``eval/eos_rate`` and ``eval/response_length``. Prompts come from the DataModule's
    ``eval_dataloader()``; the system must provide ``evaluate_batch``.
    """

    def __init__(self, gold_reward: str | None = None, every_n_steps: int = 10, max_batches: int | None = None,
                 at_start: bool = True):
        self.gold_reward = gold_reward
        self.every_n_steps = every_n_steps
        self.max_batches = max_batches
        self.at_start = at_start
        self._gold = load_callable(gold_reward) if gold_reward else None

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        loader = trainer.datamodule.eval_dataloader()
        rows: dict[str, list] = {"proxy": [], "kl": [], "length": [], "ended": [], "gold": []}
        for i, batch in enumerate(loader):
            if self.max_batches is not None and i >= self.max_batches:
                break
            batch = {k: v.to(pl_module.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            out = pl_module.evaluate_batch(batch)
            for k in ("proxy", "kl", "length", "ended"):
                rows[k] += out[k]
            if self._gold is not None:
                rows["gold"] += [float(self._gold(p, r)) for p, r in zip(out["prompts"], out["responses"])]
        n = max(1, len(rows["proxy"]))
        metrics = {
            "eval/proxy_reward": sum(rows["proxy"]) / n,
            "eval/kl": sum(rows["kl"]) / n,
            "eval/response_length": sum(rows["length"]) / n,
            "eval/eos_rate": sum(map(float, rows["ended"])) / n,
        }
        if rows["gold"]:
            metrics["eval/gold_reward"] = sum(rows["gold"]) / n
        return metrics

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = self.evaluate(trainer, pl_module)
        metrics = {k: trainer.strategy.reduce(torch.tensor(v, device=pl_module.device), reduce_op="mean").item()
                   for k, v in metrics.items()}
        for logger in trainer.loggers:
            logger.log_metrics({**metrics, "ppo/iteration": float(getattr(pl_module, "iteration", 0))},
                               step=trainer.global_step)
        log.info("step %d: %s", trainer.global_step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_start and getattr(pl_module, "iteration", 0) == 0:
            self._run(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        iteration = getattr(pl_module, "iteration", batch_idx + 1)
        if self.every_n_steps and iteration % self.every_n_steps == 0:
            self._run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        iteration = getattr(pl_module, "iteration", 0)
        if not self.every_n_steps or iteration % self.every_n_steps:
            self._run(trainer, pl_module)
