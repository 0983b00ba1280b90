"""Pairwise (Bradley–Terry) reward modelling, and the score normalisation the PPO stage relies on.

``RewardModule`` trains a ``RewardModel`` (a ``*ForSequenceClassification`` with one
label, score read at the last non-pad token) on ``PreferenceDataModule`` batches.
``RewardNormalization`` is the callback that, when training ends, fixes a gain and a
bias so that scores on the SFT demonstrations have mean 0 and std 1; both are saved in
the export's ``config.json`` and applied by ``models.load_reward_model``.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics.classification import BinaryAccuracy

from rlhf_lightning.data.collate import SFTCollator, tokenize_sft
from rlhf_lightning.data.records import load_examples
from rlhf_lightning.losses import pairwise_loss
from rlhf_lightning.models import REWARD_BIAS_KEY, REWARD_GAIN_KEY, LoraSettings, RewardModel, build_reward_model
from rlhf_lightning.systems.base import RLHFSystem

log = logging.getLogger(__name__)


class RewardModule(RLHFSystem):
    """Reward model trained with the pairwise loss on chosen/rejected pairs.

    One forward pass scores the whole ``(2B, T)`` batch (rows ``0..B-1`` chosen,
    ``B..2B-1`` rejected). Logs ``rm/loss``, ``rm/accuracy``, ``rm/margin``,
    ``rm/chosen_mean``, ``rm/rejected_mean``, ``rm/chosen_std``, ``rm/rejected_std``
    every step and ``val/rm/loss``, ``val/rm/accuracy``, ``val/rm/margin``,
    ``val/rm/chosen_mean``, ``val/rm/rejected_mean`` per validation epoch.
    """

    def __init__(
        self,
        model: str | None = None,
        model_config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        center_coef: float = 0.0,
        use_margin: bool = True,
        use_soft_labels: bool = True,
        disable_dropout: bool = True,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        lora: LoraSettings | None = None,
    ):
        """
        Args:
            model: causal LM to start from (the SFT export, or a hub name); the score head is new.
            model_config: ``transformers`` config fields of a model built from scratch instead.
            tokenizer: tokenizer name or path (linked from ``data`` by the CLI); default ``model``.
            optimizer: ``params -> Optimizer``.
            lr_scheduler: ``optimizer -> LRScheduler``, stepped every optimizer step.
            center_coef: weight of the reward-centering term ``(r_c + r_r)^2`` (0: off).
            use_margin: subtract the data's per-pair ``margin`` inside the loss (Llama 2).
            use_soft_labels: train on the data's per-pair ``probability`` (AI feedback's soft
                labels) with the binary cross-entropy of the Bradley–Terry logit.
            disable_dropout: zero every dropout, so chosen and rejected see the same network.
            gradient_checkpointing: trade compute for memory on large backbones.
            trust_remote_code: passed to the model and tokenizer loaders.
            lora: LoRA adapters on the backbone, the score head trained in full. The export
                is merged (the score normalisation travels in its ``config.json``).
        """
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if (model is None) == (model_config is None):
            raise ValueError("set exactly one of model (SFT export, hub name or path) or model_config")
        if tokenizer is None and model is None:
            raise ValueError("a model built from model_config needs a tokenizer path")
        if LoraSettings.coerce(lora) is not None and LoraSettings.coerce(lora).export != "merged":
            raise ValueError(
                "reward exports are merged (lora.export: merged): their normalisation lives in config.json"
            )
        self._setup(tokenizer or model, optimizer, lr_scheduler, trust_remote_code)
        self.reward_model: RewardModel | None = None
        # Pairs ranked correctly over the whole validation split (reduced across ranks).
        self.val_accuracy = BinaryAccuracy()

    def build_models(self) -> None:
        hp = self.hparams
        rm = build_reward_model(hp.model, self.tokenizer, hp.model_config, hp.trust_remote_code)
        self.reward_model = self.prepare_trainable(rm)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Scores ``(N,)`` of right-padded sequences; raw (what the loss sees) unless ``normalize``."""
        return self.reward_model(input_ids, attention_mask, normalize=normalize)

    def _step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        B = int(batch["num_pairs"])
        scores = self(batch["input_ids"], batch["attention_mask"]).float()  # (2B,) one pass for both halves
        chosen, rejected = scores[:B], scores[B:]  # (B,), (B,)
        margin = batch.get("margin") if self.hparams.use_margin else None
        target = batch.get("probability") if self.hparams.get("use_soft_labels", True) else None
        loss, metrics = pairwise_loss(chosen, rejected, margin, self.hparams.center_coef, target)
        metrics["diff"] = (chosen - rejected).detach()  # (B,)
        # Spread of the scores: a collapsing or exploding reward shows here first.
        metrics["chosen_std"] = chosen.detach().std(correction=0)
        metrics["rejected_std"] = rejected.detach().std(correction=0)
        return loss, metrics

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, metrics = self._step(batch)
        B = int(batch["num_pairs"])
        self.log("rm/loss", metrics["loss"], prog_bar=True, batch_size=B)
        self.log("rm/accuracy", metrics["accuracy"], prog_bar=True, batch_size=B)
        for name in ("margin", "chosen_mean", "rejected_mean", "chosen_std", "rejected_std"):
            self.log(f"rm/{name}", metrics[name], batch_size=B)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        _, metrics = self._step(batch)
        B = int(batch["num_pairs"])
        diff = metrics["diff"]
        # Ties count as errors, as in pairwise_loss's accuracy.
        self.val_accuracy.update((diff > 0).long(), torch.ones_like(diff, dtype=torch.long))
        self.log("val/rm/accuracy", self.val_accuracy, prog_bar=True, batch_size=B)
        for name in ("loss", "margin", "chosen_mean", "rejected_mean"):
            self.log(f"val/rm/{name}", metrics[name], prog_bar=name == "loss", batch_size=B, sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # The normalisation lives in the model config, not in the state dict.
        if self.reward_model is not None:
            checkpoint["reward_normalization"] = {"gain": self.reward_model.gain, "bias": self.reward_model.bias}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        norm = checkpoint.get("reward_normalization")
        if norm is not None:
            self.configure_model()
            self.reward_model.set_normalization(norm["gain"], norm["bias"])

    def export_model(self) -> torch.nn.Module:
        """The ``*ForSequenceClassification`` (gain and bias travel in its config)."""
        return self.reward_model.model


@torch.no_grad()
def score_batches(
    reward_model: RewardModel,
    batches: list[dict[str, torch.Tensor]],
    device: torch.device | str = "cpu",
    normalize: bool | None = None,
) -> torch.Tensor:
    """Scores ``(N,)`` of collated right-padded batches, in eval mode (the mode is restored).

    ``normalize``: apply the stored gain/bias (True), not (False), or as the model is set (None).
    """
    was_training = reward_model.training
    reward_model.eval()
    try:
        out = [
            reward_model(b["input_ids"].to(device), b["attention_mask"].to(device), normalize=normalize).float()
            for b in batches
        ]
    finally:
        reward_model.train(was_training)
    return torch.cat(out)  # (N,)


class RewardNormalization(L.Callback):
    """Fix the reward model's gain and bias so its scores on SFT demonstrations have mean 0, std 1.

    Scores ``prompt + response + EOS`` of the first ``max_samples`` records of
    ``samples_file`` (SFT format, tokenised as the SFT stage does, right-padded) with the
    raw model, then stores ``gain = 1/std`` and ``bias = -mean/std`` (population std) with
    ``RewardModel.set_normalization``: they travel in the export's ``config.json`` and
    ``load_reward_model`` applies them. Logs ``rm/norm_raw_mean``, ``rm/norm_raw_std``,
    ``rm/norm_gain``, ``rm/norm_bias``.

    It runs in ``on_train_end``: the model is still on its device, and this always comes
    before ``HFExport`` (``on_fit_end``, after the Trainer's teardown). A weight-averaging
    callback (``EMAWeightAveraging``), which swaps in its weights in ``on_train_end`` too,
    must be listed before it (checked at setup). Every rank scores the same samples, so
    every rank computes the same gain and bias (and sharded strategies, which need all
    ranks in each forward, work).

    Args:
        samples_file: SFT demonstrations (any source ``records.load_examples`` reads).
        max_samples: how many records to score (the file's first ones).
        batch_size: scoring batch size.
        max_prompt_length: prompt truncation; default the DataModule's ``max_prompt_length``.
        max_response_length: response truncation; default the DataModule's ``max_response_length``.
    """

    def __init__(
        self,
        samples_file: str,
        max_samples: int = 2000,
        batch_size: int = 64,
        max_prompt_length: int | None = None,
        max_response_length: int | None = None,
    ):
        self.samples_file = samples_file
        self.max_samples = max_samples
        self.batch_size = batch_size
        self.max_prompt_length = max_prompt_length
        self.max_response_length = max_response_length
        self.raw_mean: float | None = None
        self.raw_std: float | None = None

    def _lengths(self, trainer: L.Trainer | None) -> tuple[int, int]:
        dm_hp = getattr(getattr(trainer, "datamodule", None), "hparams", {}) if trainer is not None else {}
        prompt = self.max_prompt_length or dm_hp.get("max_prompt_length", 128)
        response = self.max_response_length or dm_hp.get("max_response_length", 128)
        return prompt, response

    def batches(self, tokenizer: Any, trainer: L.Trainer | None = None) -> list[dict[str, torch.Tensor]]:
        """The samples tokenised and collated, sorted by length (less padding; order is irrelevant)."""
        examples = load_examples(self.samples_file, "sft", tokenizer)[: self.max_samples]
        if not examples:
            raise ValueError(f"{self.samples_file}: no SFT records to normalise the reward model on")
        max_prompt, max_response = self._lengths(trainer)
        features = sorted(
            (tokenize_sft(ex, tokenizer, max_prompt, max_response) for ex in examples),
            key=lambda f: len(f["input_ids"]),
        )
        collate = SFTCollator(tokenizer.pad_token_id)
        return [collate(features[i : i + self.batch_size]) for i in range(0, len(features), self.batch_size)]

    def normalize(self, module: RewardModule, trainer: L.Trainer | None = None) -> tuple[float, float]:
        """Score the samples, set gain and bias on ``module.reward_model``; returns the raw ``(mean, std)``."""
        batches = self.batches(module.tokenizer, trainer)
        raw = score_batches(module.reward_model, batches, module.device, normalize=False).double()  # (N,)
        mean, std = raw.mean().item(), raw.std(correction=0).item()
        if not std > 1e-8:
            raise ValueError(f"reward scores on {len(raw)} samples have std {std}; cannot normalise")
        module.reward_model.set_normalization(1.0 / std, -mean / std)
        self.raw_mean, self.raw_std = mean, std
        return mean, std

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # A weight-averaging callback (EMA, SWA) copies its weights into the model in its own
        # on_train_end: it must come first, or the gain and bias would describe other weights.
        callbacks = list(trainer.callbacks)
        late = [cb for cb in callbacks[callbacks.index(self) + 1 :] if isinstance(cb, WeightAveraging)]
        if late:
            raise ValueError(
                f"put {type(late[0]).__name__} before RewardNormalization in trainer.callbacks: "
                "the averaged weights must be in place before the scores are normalised"
            )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, RewardModule):
            raise TypeError(f"RewardNormalization needs a RewardModule, got {type(pl_module).__name__}")
        mean, std = self.normalize(pl_module, trainer)
        rm = pl_module.reward_model
        metrics = {"rm/norm_raw_mean": mean, "rm/norm_raw_std": std, "rm/norm_gain": rm.gain, "rm/norm_bias": rm.bias}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            log.info(
                "reward normalisation on %s: raw mean %.4f, std %.4f -> %s=%.4f, %s=%.4f",
                self.samples_file,
                mean,
                std,
                REWARD_GAIN_KEY,
                rm.gain,
                REWARD_BIAS_KEY,
                rm.bias,
            )
