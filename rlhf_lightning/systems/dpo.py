"""Direct Preference Optimization (Rafailov et al. 2023) and its relatives, as one system.

The variant is the loss function passed in (``loss_fn``: ``dpo_loss``, ``ipo_loss``,
``hinge_loss``, ``simpo_loss`` or your own with the same signature). Its attributes tell
this module how to call it: ``reference_free`` (no reference model is loaded) and
``length_normalized`` (per-token mean log-probs instead of sums).

One training step: one forward of the policy over the ``(2B, T)`` batch (chosen rows
``0..B-1``, rejected ``B..2B-1``), one no-grad forward of the frozen reference over the
same batch (or a look-up in its precomputed log-probs), the loss, and the backward.
"""

from __future__ import annotations

import copy
import gc
import inspect
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from rlhf_lightning.data.collate import IGNORE_INDEX
from rlhf_lightning.generation import SamplingConfig
from rlhf_lightning.importing import import_callable, import_path
from rlhf_lightning.logprobs import sequence_logprobs
from rlhf_lightning.losses import dpo_loss
from rlhf_lightning.models import DEFAULT_CHUNK_SIZE, LoraSettings, response_logprobs
from rlhf_lightning.systems.base import PolicySystem

log = logging.getLogger(__name__)


def sequence_logps(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    average: bool = False,
    chunk_size: int | str | None = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """``(N,)`` log-probs of each row's response tokens (``labels != -100``), summed or averaged.

    The scored columns start at the first column holding a response token in any row
    (``models.response_logprobs`` skips the LM head on the prompt columns before it);
    prompt and padding positions after it carry ``-100`` and count for nothing.
    ``chunk_size`` rows of logits exist at a time (None: the full logits).
    """
    scored = batch["labels"] != IGNORE_INDEX  # (N, T)
    start = int(scored.any(0).int().argmax())  # first column with a scored token
    logps = response_logprobs(model, batch["input_ids"], batch["attention_mask"], max(start, 1), chunk_size=chunk_size)
    return sequence_logprobs(logps.logprobs, scored[:, max(start, 1) :], average=average)  # (N,)


class DPOModule(PolicySystem):
    """Offline preference optimisation of a causal LM on ``PreferenceDataModule`` batches.

    Logs ``dpo/{loss, reward_accuracy, reward_margin, chosen_reward, rejected_reward,
    chosen_logp, rejected_logp}`` every step and the same under ``val/dpo/`` per
    validation epoch (means over pairs). Rewards are the loss function's implicit
    rewards (``beta * (log pi - log ref)`` for DPO); ``*_logp`` are the policy's
    sequence log-probs (watch ``chosen_logp``: it can fall while the margin grows).
    """

    def __init__(
        self,
        model: str | None = None,
        model_config: dict[str, Any] | None = None,
        ref_model: str | None = None,
        tokenizer: str | None = None,
        loss_fn: Callable = dpo_loss,
        beta: float = 0.1,
        loss_kwargs: dict[str, Any] | None = None,
        precompute_ref_logps: bool = False,
        disable_dropout: bool = True,
        gradient_checkpointing: bool = False,
        logprob_chunk_size: int | str | None = DEFAULT_CHUNK_SIZE,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        trust_remote_code: bool = False,
        sampling: SamplingConfig | None = None,
        lora: LoraSettings | None = None,
    ):
        """
        Args:
            model: the policy's starting point (the SFT export, a hub name).
            model_config: build the policy from scratch instead (tests, toy runs).
            ref_model: the frozen reference; default: a second copy of ``model`` (or of
                the freshly built policy when ``model_config`` is used), or with ``lora``
                the policy itself with its adapter off (no copy).
            loss_fn: the preference loss, e.g. ``rlhf_lightning.losses.ipo_loss`` in YAML.
            beta: passed to ``loss_fn`` (strength of the implicit KL constraint).
            loss_kwargs: extra keyword arguments of ``loss_fn`` (``label_smoothing``, ``gamma``).
            precompute_ref_logps: score the training and validation sets with the
                reference once when fit starts, then free the reference model.
            disable_dropout: zero every dropout probability in policy and reference.
            gradient_checkpointing: recompute the policy's activations in backward
                (less memory, about a third more compute).
            logprob_chunk_size: log-probs come from the last hidden states this many rows
                at a time (``"auto"``: about 2^25 logits), never the full ``(2B, T, V)``
                logits; None: from full logits.
            lora: train LoRA adapters instead of every weight (``models.LoraSettings``).
        """
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "loss_fn"])
        self.loss_fn = import_callable(loss_fn)
        # Stored as an import path: checkpoints stay loadable with ``weights_only=True``.
        self.hparams["loss_fn"] = import_path(self.loss_fn)
        self._setup_policy(model, model_config, tokenizer, optimizer, lr_scheduler, trust_remote_code, sampling)
        self.loss_kwargs = dict(loss_kwargs or {})
        try:  # fail now, not at the first step, on an argument the loss does not take
            inspect.signature(self.loss_fn).bind_partial(beta=beta, **self.loss_kwargs)
        except TypeError as e:
            raise TypeError(f"loss_kwargs {self.loss_kwargs} do not fit {self.hparams.loss_fn}: {e}") from None
        self.needs_reference = not getattr(self.loss_fn, "reference_free", False)
        self.length_normalized = bool(getattr(self.loss_fn, "length_normalized", False))
        self.chunk_size = logprob_chunk_size
        # A reference that can be reloaded from its export is not stored in checkpoints.
        self.ref_reloadable = (ref_model or model) is not None
        self.ref_policy = None
        self.ref_cache: dict[str, torch.Tensor] = {}  # split -> (N, 2) chosen/rejected ref log-probs

    # ----------------------------------------------------------------------------- models
    def build_models(self) -> None:
        self.policy = self.load_policy()
        if self.needs_reference:
            self._load_reference()

    def _load_reference(self) -> None:
        hp = self.hparams
        if self.reference_is_base:
            return  # the policy with its adapter off (PolicySystem.reference)
        if self.ref_reloadable:
            ref = self.load_frozen_lm(hp.ref_model or hp.model)
        elif self.policy is not None and self.global_step == 0:
            ref = copy.deepcopy(self.policy)  # a policy built from model_config, before any update
        else:
            raise RuntimeError("no reference to reload: set ref_model (or model) to an export")
        self.add_frozen("ref_policy", ref, reloadable=self.ref_reloadable)

    # ----------------------------------------------------------------------------- reference log-probs
    @torch.no_grad()
    def cache_reference_logps(self, loaders: dict[str, Iterable[dict[str, Any]]]) -> None:
        """Score every pair of each split with the reference once and keep ``(N, 2)`` log-probs.

        Batches must carry ``index`` (``PreferenceDataModule`` does): the cache is keyed by
        it, so any order or batch size works. Under several ranks each rank scores what its
        loader deals it (its share of the training pairs; the validation loader is not split,
        so every rank scores all of it) and the ranks exchange their scores, so every rank
        holds the whole cache (an index scored twice keeps one of its equal values).
        """
        if self.ref_policy is None and not self.reference_is_base:
            self._load_reference()
            self.ref_policy.to(self.device)
        for split, loader in loaders.items():
            indices, values = [], []
            for batch in loader:
                if "index" not in batch:
                    raise KeyError("precompute_ref_logps needs batches with an 'index' (PreferenceDataModule)")
                batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                with self.reference() as ref:
                    logps = sequence_logps(ref, batch, self.length_normalized, self.chunk_size)  # (2B,)
                indices.append(batch["index"].cpu())
                values.append(torch.stack(logps.chunk(2), dim=-1).float().cpu())  # (B, 2)
            index = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long)  # (N,)
            value = torch.cat(values) if values else torch.zeros(0, 2)  # (N, 2)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                shares = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(shares, (index, value))  # every rank, even with no batch
                index, value = torch.cat([i for i, _ in shares]), torch.cat([v for _, v in shares])
            if not len(index):
                continue
            cache = torch.full((int(index.max()) + 1, 2), float("nan"))
            cache[index] = value
            if cache.isnan().any():
                raise ValueError(f"{split}: indices are not 0..N-1; cannot cache reference log-probs")
            self.ref_cache[split] = cache.to(self.device)

    def free_reference(self) -> None:
        """Drop the reference model (after caching its log-probs) to give back its memory."""
        self.remove_frozen("ref_policy")
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def on_fit_start(self) -> None:
        if not (self.hparams.precompute_ref_logps and self.needs_reference):
            return
        dm = self.trainer.datamodule
        if dm is None:
            raise RuntimeError("precompute_ref_logps needs a DataModule (its loaders are scored before training)")
        loaders = {"train": dm.train_dataloader()}
        val = dm.val_dataloader() if self.trainer.limit_val_batches != 0 else []
        if val:
            loaders["val"] = val[0] if isinstance(val, (list, tuple)) else val
        start = time.perf_counter()
        self.cache_reference_logps(loaders)
        self.free_reference()
        n = {k: len(v) for k, v in self.ref_cache.items()}
        log.info("cached reference log-probs for %s pairs in %.1f s; reference freed", n, time.perf_counter() - start)

    def reference_logps(self, batch: dict[str, Any], split: str) -> torch.Tensor | None:
        """``(2B,)`` reference log-probs: from the cache when it holds this split, else a forward."""
        if not self.needs_reference:
            return None
        cache = self.ref_cache.get(split)
        if cache is not None and "index" in batch:
            pair = cache[batch["index"]]  # (B, 2)
            return torch.cat([pair[:, 0], pair[:, 1]])  # (2B,)
        if self.ref_policy is None and not self.reference_is_base:
            raise RuntimeError(f"no cached reference log-probs for split {split!r} and no reference model")
        with torch.no_grad(), self.reference() as ref:
            return sequence_logps(ref, batch, self.length_normalized, self.chunk_size)

    # ----------------------------------------------------------------------------- steps
    def _loss(self, batch: dict[str, Any], split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = batch["input_ids"].shape[0] // 2
        # (2B,) chosen and rejected in one pass
        logps = sequence_logps(self.policy, batch, self.length_normalized, self.chunk_size)
        ref = self.reference_logps(batch, split)  # (2B,) or None
        loss, metrics = self.loss_fn(
            logps[:n],
            logps[n:],
            None if ref is None else ref[:n],
            None if ref is None else ref[n:],
            beta=self.hparams.beta,
            **self.loss_kwargs,
        )
        metrics["chosen_logp"] = logps[:n].detach().mean()
        metrics["rejected_logp"] = logps[n:].detach().mean()
        return loss, metrics

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, metrics = self._loss(batch, "train")
        n = batch["input_ids"].shape[0] // 2
        self.log("dpo/loss", metrics.pop("loss"), prog_bar=True, batch_size=n)
        self.log_dict({f"dpo/{k}": v for k, v in metrics.items()}, batch_size=n)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        _, metrics = self._loss(batch, "val")
        self.log_dict(
            {f"val/dpo/{k}": v for k, v in metrics.items()}, batch_size=batch["input_ids"].shape[0] // 2, sync_dist=True
        )
