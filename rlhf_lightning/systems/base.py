"""What every system shares: tokenizer, model preparation, frozen models, optimizers, export.

Each system (SFT, reward, DPO, PPO, ...) keeps its own typed ``__init__`` so that
``--print_config`` shows every knob, calls :meth:`RLHFSystem._setup` from it, and builds
its models in :meth:`RLHFSystem.build_models`. The base then takes care of:

* **preparation**: trainable models go through :meth:`prepare_trainable` (train mode,
  dropout off when the system has ``disable_dropout``, gradient checkpointing when it has
  ``gradient_checkpointing``); adapters will plug in here too;
* **frozen models** (reference, reward model), registered with :meth:`add_frozen`: eval
  mode whatever Lightning asks of the system, no gradients, never in an optimizer, and
  left out of checkpoints when they can be reloaded from their export;
* **optimizers**: the injected optimizer and scheduler over :meth:`param_groups`;
* **export**: ``save_pretrained`` of :meth:`export_model` with the tokenizer.

The maths stays in ``losses.py``, ``advantages.py`` and ``logprobs.py``; log-probs of
responses come from ``models.response_logprobs``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

from rlhf_lightning.generation import SamplingConfig, decode_responses, sample_responses
from rlhf_lightning.models import (
    check_finite_weights,
    load_causal_lm,
    load_tokenizer,
    prepare_frozen,
    prepare_trainable,
    save_hf,
)
from rlhf_lightning.optim import build_optimization


class RLHFSystem(L.LightningModule):
    """Base of every system (see the module docstring)."""

    def _setup(self, tokenizer: str | None, optimizer, lr_scheduler, trust_remote_code: bool) -> None:
        """Common ``__init__`` work; call it right after ``save_hyperparameters``."""
        if tokenizer is None:
            raise ValueError("no tokenizer: set model (an export or hub name, whose tokenizer is used) or tokenizer")
        self.trust_remote_code = trust_remote_code
        self.optimizer_factory = optimizer if optimizer is not None else torch.optim.AdamW
        self.scheduler_factory = lr_scheduler
        self.tokenizer = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
        # name -> whether it is reloaded from an export (then left out of checkpoints)
        self._frozen: dict[str, bool] = {}
        self._models_built = False
        # Frozen weights are reloaded from their exports, so checkpoints may lack them.
        self.strict_loading = False

    # ----------------------------------------------------------------------------- models
    def build_models(self) -> None:
        """Create the system's models (called once, by ``configure_model``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_models")

    def configure_model(self) -> None:
        # Lightning may call this more than once (fit after a checkpoint load, say).
        if not self._models_built:
            self.build_models()
            self._models_built = True

    def prepare_trainable(self, model: torch.nn.Module) -> torch.nn.Module:
        """Train mode; dropout off and gradient checkpointing as the system's hyperparameters say."""
        return prepare_trainable(
            model,
            no_dropout=bool(self.hparams.get("disable_dropout", False)),
            gradient_checkpointing=bool(self.hparams.get("gradient_checkpointing", False)),
        )

    def add_frozen(self, name: str, model: torch.nn.Module, reloadable: bool = True) -> torch.nn.Module:
        """Register ``model`` as the frozen attribute ``name`` (reference, reward model).

        ``reloadable``: it comes from an export that a resumed run loads again, so its
        weights are not copied into every checkpoint.
        """
        prepare_frozen(model, no_dropout=bool(self.hparams.get("disable_dropout", True)))
        setattr(self, name, model)
        self._frozen[name] = reloadable
        return model

    def remove_frozen(self, name: str) -> None:
        """Drop a frozen model (e.g. the reference once its log-probs are cached)."""
        setattr(self, name, None)
        self._frozen.pop(name, None)

    def train(self, mode: bool = True):
        # Lightning calls .train() on the whole system; frozen models stay in eval mode.
        super().train(mode)
        for name in self._frozen if hasattr(self, "_frozen") else ():
            module = getattr(self, name, None)
            if module is not None:
                module.eval()
        return self

    # ----------------------------------------------------------------------------- optimisation
    def param_groups(self) -> list[torch.nn.Parameter] | list[dict[str, Any]]:
        """What the optimizer updates: by default every parameter that requires a gradient."""
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        return build_optimization(self, self.param_groups(), self.optimizer_factory, self.scheduler_factory)

    # ----------------------------------------------------------------------------- checkpoints
    def _reloaded_prefixes(self) -> tuple[str, ...]:
        return tuple(f"{name}." for name, reloadable in self._frozen.items() if reloadable)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        prefixes = self._reloaded_prefixes()
        state = checkpoint["state_dict"]
        for key in [k for k in state if prefixes and k.startswith(prefixes)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        frozen = tuple(f"{name}." for name in self._frozen)
        state = checkpoint["state_dict"]
        missing = [k for k in self.state_dict() if not (frozen and k.startswith(frozen)) and k not in state]
        if missing:
            raise KeyError(f"checkpoint lacks trainable weights, e.g. {missing[:3]}")

    # ----------------------------------------------------------------------------- export
    def export_model(self) -> torch.nn.Module:
        """The ``PreTrainedModel`` the next stage loads."""
        raise NotImplementedError(f"{type(self).__name__} must implement export_model")

    def export_hf(self, path: str | Path) -> Path:
        """``save_pretrained`` the exported model and the tokenizer (the hand-off to the next stage)."""
        model = self.export_model()
        check_finite_weights(model, f"{type(self).__name__} to {path}")
        return save_hf(model, self.tokenizer, path)


class PolicySystem(RLHFSystem):
    """Base of the systems that train a causal-LM policy (``self.policy``): SFT, DPO, PPO, ..."""

    policy: torch.nn.Module | None

    def _setup_policy(
        self,
        model: str | None,
        model_config: dict[str, Any] | None,
        tokenizer: str | None,
        optimizer,
        lr_scheduler,
        trust_remote_code: bool,
        sampling: SamplingConfig | None,
    ) -> None:
        if model is None and model_config is None:
            raise ValueError("set model (hub name or path) or model_config (a tiny model from scratch)")
        if tokenizer is None and model is None:
            raise ValueError("a model built from model_config needs a tokenizer path")
        self.model_name = model
        self.model_config = model_config
        self.sampling = sampling or SamplingConfig()
        self._setup(tokenizer or model, optimizer, lr_scheduler, trust_remote_code)
        self.policy = None

    @property
    def logprob_temperature(self) -> float:
        """The temperature log-probs are computed at: the sampling temperature unless set otherwise."""
        return self.hparams.get("logprob_temperature") or self.sampling.temperature

    def load_policy(self) -> torch.nn.Module:
        """The policy from ``model`` (an export, a hub name) or ``model_config``, prepared for training."""
        lm = load_causal_lm(
            self.model_name, self.tokenizer, self.model_config, trust_remote_code=self.trust_remote_code
        )
        return self.prepare_trainable(lm)

    def load_frozen_lm(self, name_or_path: str) -> torch.nn.Module:
        """A causal LM from an export, for a frozen role (register it with ``add_frozen``)."""
        return load_causal_lm(name_or_path, self.tokenizer, trust_remote_code=self.trust_remote_code)

    def export_model(self) -> torch.nn.Module:
        return self.policy

    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0) -> list[dict[str, str]]:
        """Sample responses for a batch of left-padded prompts (``PromptDataModule``)."""
        gen = sample_responses(
            self.policy,
            batch["input_ids"],
            batch["attention_mask"],
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            config=self.sampling,
        )
        texts = decode_responses(self.tokenizer, gen)
        ended = gen.ended.tolist()
        return [
            {"prompt": p, "response": r, "ended_with_eos": bool(e)}
            for p, r, e in zip(batch["prompts"], texts, ended, strict=True)
        ]
