"""Supervised fine-tuning: token-mean NLL on response tokens only."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanMetric

from rlhf_lightning.data.collate import IGNORE_INDEX
from rlhf_lightning.generation import SamplingConfig
from rlhf_lightning.losses import sft_loss
from rlhf_lightning.models import DEFAULT_CHUNK_SIZE, LoraSettings, response_logprobs
from rlhf_lightning.systems.base import PolicySystem


class SFTModule(PolicySystem):
    """SFT of a causal LM on ``SFTDataModule`` batches (prompt tokens carry label -100).

    Logs ``sft/loss`` and ``sft/ppl`` every step and ``val/sft/loss``, ``val/sft/ppl``
    per validation epoch (perplexity = exp of the token-mean NLL over the whole split).
    The NLL comes from the last hidden states ``logprob_chunk_size`` rows at a time (the
    ``(B, T, V)`` logits are never built; None builds them).
    """

    def __init__(
        self,
        model: str | None = None,
        model_config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        gradient_checkpointing: bool = False,
        logprob_chunk_size: int | str | None = DEFAULT_CHUNK_SIZE,
        trust_remote_code: bool = False,
        sampling: SamplingConfig | None = None,
        lora: LoraSettings | None = None,
    ):
        """``lora``: train LoRA adapters instead of every weight (``models.LoraSettings``); the
        export is then the merged model unless ``lora.export`` is ``adapter``."""
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self._setup_policy(model, model_config, tokenizer, optimizer, lr_scheduler, trust_remote_code, sampling)
        # Token-weighted mean of the validation NLL, reduced across ranks by torchmetrics.
        self.val_nll = MeanMetric()

    def build_models(self) -> None:
        self.policy = self.load_policy()

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # Log-probs of the labelled tokens only, from the columns where the first label
        # appears, in chunks of ``logprob_chunk_size`` rows (None: from full logits).
        labels = batch["labels"]  # (B, T)
        start = int((labels[:, 1:] != IGNORE_INDEX).any(0).int().argmax()) + 1  # first scored column
        safe = torch.where(labels == IGNORE_INDEX, torch.zeros_like(labels), labels)  # (B, T)
        chunk = self.hparams.logprob_chunk_size
        out = response_logprobs(
            self.policy, batch["input_ids"], batch["attention_mask"], start, chunk_size=chunk, targets=safe
        )
        logps = F.pad(out.logprobs, (start - 1, 0))  # (B, T-1), 0 on unscored prompt columns
        # Training batches carry the step's token share: with Lightning's division by
        # accumulate_grad_batches and DDP's mean over ranks, the step's gradient is that of
        # the token mean over all its micro-batches (SFTDataModule, losses.sft_loss).
        return sft_loss(None, labels, denominator=batch.get("loss_denominator"), logps=logps)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, metrics = self._loss(batch)
        bs = batch["input_ids"].shape[0]
        self.log("sft/loss", metrics["loss"], prog_bar=True, batch_size=bs)  # this micro-batch's token mean
        self.log("sft/ppl", torch.exp(metrics["loss"]), batch_size=bs)
        self.log("sft/tokens", metrics["ntokens"].float(), reduce_fx="sum", batch_size=bs)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, metrics = self._loss(batch)
        self.val_nll.update(metrics["loss"], weight=metrics["ntokens"].float())

    def on_validation_epoch_end(self) -> None:
        if self.val_nll.update_count == 0:
            return
        nll = self.val_nll.compute()
        self.val_nll.reset()
        self.log("val/sft/loss", nll, prog_bar=True, sync_dist=False)
        self.log("val/sft/ppl", torch.exp(nll.clamp(max=math.log(1e6))), sync_dist=False)
