"""What every system shares: tokenizer, model preparation, frozen models, optimizers, export.

Each system (SFT, reward, DPO, PPO, ...) keeps its own typed ``__init__`` so that
``--print_config`` shows every knob, calls :meth:`RLHFSystem._setup` from it, and builds
its models in :meth:`RLHFSystem.build_models`. The base then takes care of:

* **preparation**: trainable models go through :meth:`prepare_trainable` (LoRA adapters
  when the system has ``lora``, train mode, dropout off when it has ``disable_dropout``,
  gradient checkpointing when it has ``gradient_checkpointing``); the trainable share of
  the parameters is logged once the models are built;
* **the reference** of a LoRA policy is the policy with its adapter off
  (:meth:`PolicySystem.reference`): no second copy of the weights;
* **frozen models** (reference, reward model), registered with :meth:`add_frozen`: eval
  mode whatever Lightning asks of the system, no gradients, never in an optimizer, and
  left out of checkpoints when they can be reloaded from their export (except sharded
  FSDP2 checkpoints, whose loader asks for every weight);
* **optimizers**: the injected optimizer and scheduler over :meth:`param_groups`;
* **export**: ``save_pretrained`` of :meth:`export_model` with the tokenizer; with LoRA the
  adapter is merged into the exported weights unless ``lora.export`` is ``adapter``;
* **checkpoints** of a LoRA model whose base reloads from an export hold the adapter and
  the fully trained modules, not the frozen base weights; with :class:`ExactResume` they
  carry what a resumed run needs to continue the very same run (``resume.py``).

The maths stays in ``losses.py``, ``advantages.py`` and ``logprobs.py``; log-probs of
responses come from ``models.response_logprobs``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from transformers import PreTrainedModel

from rlhf_lightning.generation import SamplingConfig, decode_responses, sample_responses
from rlhf_lightning.models import (
    LoraSettings,
    RewardModel,
    ValueHead,
    adapter_disabled,
    check_finite_weights,
    count_parameters,
    has_lora,
    holds_shards,
    load_causal_lm,
    load_tokenizer,
    merged_copy,
    prepare_frozen,
    prepare_trainable,
    save_adapter,
    save_hf,
    shard,
)
from rlhf_lightning.optim import build_optimization
from rlhf_lightning.resume import ExactResume


class RLHFSystem(ExactResume, L.LightningModule):
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
            if self.device_mesh is not None:  # ModelParallelStrategy
                self.shard_models(self.device_mesh)
            self.trainable_params = self._count_trainable()
            n, total = self.trainable_params
            rank_zero_info(
                f"{type(self).__name__}: trainable params: {n:,} of {total:,} ({100 * n / max(total, 1):.2f}%)"
            )

    def shard_models(self, mesh) -> None:
        """FSDP2: shard the system's models over the data-parallel ranks (``models/sharding.py``).

        A trainable model is a ``transformers`` model (LoRA adapters included) or one of the
        wrappers whose calls go through FSDP2's gathering (the reward model, the critics:
        ``fsdp_forward_methods``); anything else fails here rather than train unsynchronised
        on each rank. Frozen models of those kinds (reference, reward model) are sharded too
        and gather their weights for each forward, so none is held whole on every rank.
        """
        if mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                "only data parallelism (FSDP2) is implemented: use "
                "ModelParallelStrategy(data_parallel_size=<number of devices>, tensor_parallel_size=1)"
            )
        trainable = {
            name: child
            for name, child in self.named_children()
            if name not in self._frozen and any(p.requires_grad for p in child.parameters())
        }
        for name, child in trainable.items():
            if not isinstance(child, PreTrainedModel | RewardModel | ValueHead):
                raise NotImplementedError(
                    f"FSDP2 cannot shard {name} ({type(child).__name__}): only transformers models and the "
                    "RewardModel/ValueHead wrappers route their calls through FSDP2's weight gathering"
                )
        for child in trainable.values():
            shard(child, mesh["data_parallel"])
        for name in list(self._frozen):
            child = getattr(self, name, None)
            if isinstance(child, PreTrainedModel | RewardModel):
                shard(child, mesh["data_parallel"], frozen=True)

    @property
    def lora(self) -> LoraSettings | None:
        """The LoRA settings of the trainable models (``lora`` hyperparameter), or None: full fine-tuning."""
        return LoraSettings.coerce(self.hparams.get("lora"))

    def prepare_trainable(self, model: torch.nn.Module) -> torch.nn.Module:
        """LoRA, train mode, dropout off and gradient checkpointing as the system's hyperparameters say."""
        return prepare_trainable(
            model,
            no_dropout=bool(self.hparams.get("disable_dropout", False)),
            gradient_checkpointing=bool(self.hparams.get("gradient_checkpointing", False)),
            lora=self.lora,
        )

    def _count_trainable(self) -> tuple[int, int]:
        """``(trainable, total)`` parameters of the models this system trains (frozen ones left out)."""
        frozen = {id(p) for name in self._frozen for p in getattr(self, name).parameters()}
        trainable, total = count_parameters(self)
        frozen_total = sum(p.numel() for p in self.parameters() if id(p) in frozen)
        return trainable, total - frozen_total

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

    def _reloaded_base_keys(self) -> set[str]:
        """The frozen base weights of LoRA models, when the base reloads from an export (``model``)."""
        if self.lora is None or self.hparams.get("model") is None:
            return set()
        frozen = tuple(f"{name}." for name in self._frozen)
        return {
            name
            for name, p in self.named_parameters(remove_duplicate=False)
            if not p.requires_grad and not (frozen and name.startswith(frozen))
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        # A sharded FSDP2 checkpoint is read back by torch.distributed.checkpoint, which asks
        # for every weight of the system (Lightning passes it no way to skip any): it keeps them.
        if not holds_shards(state):
            prefixes = self._reloaded_prefixes()
            base = self._reloaded_base_keys()
            for key in [k for k in state if (prefixes and k.startswith(prefixes)) or k in base]:
                del state[key]
        super().on_save_checkpoint(checkpoint)  # ExactResume: RNG streams, log positions

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("state_dict")
        if state is None:  # ModelParallelStrategy (FSDP2) has loaded the weights in place already
            return
        frozen = tuple(f"{name}." for name in self._frozen)
        base = self._reloaded_base_keys()
        missing = [
            k for k in self.state_dict() if not (frozen and k.startswith(frozen)) and k not in base and k not in state
        ]
        if missing:
            raise KeyError(f"checkpoint lacks trainable weights, e.g. {missing[:3]}")

    # ----------------------------------------------------------------------------- export
    def export_model(self) -> torch.nn.Module:
        """The ``PreTrainedModel`` the next stage loads."""
        raise NotImplementedError(f"{type(self).__name__} must implement export_model")

    def export_hf(self, path: str | Path, model: torch.nn.Module | None = None) -> Path:
        """``save_pretrained`` the exported model and the tokenizer (the hand-off to the next stage).

        With LoRA: merged weights (a plain model: the next stage's base and reference is
        this one), or the adapter alone on top of this stage's ``model`` when ``lora.export``
        is ``adapter``. ``model``: what to export instead of :meth:`export_model` (the full copy
        of a sharded model, ``models.gathered_copy``).
        """
        model = self.export_model() if model is None else model
        check_finite_weights(model, f"{type(self).__name__} to {path}")
        if self.lora is not None and self.lora.export == "adapter":
            path = save_adapter(model, path, self.hparams.get("model"))
            self.tokenizer.save_pretrained(str(path))
            return path
        return save_hf(merged_copy(model), self.tokenizer, path)


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

    @property
    def reference_is_base(self) -> bool:
        """Whether the reference is the policy with its adapter off: LoRA, and no other reference named.

        The policy's base is what it was loaded from (an export is merged weights, an
        adapter-only export is merged on loading), so that base is the right reference.
        """
        ref = self.hparams.get("ref_model")
        return has_lora(self.policy) and (ref is None or ref == self.model_name)

    @contextmanager
    def reference(self) -> Iterator[torch.nn.Module]:
        """The frozen reference to score with: ``ref_policy``, or the policy with its adapter off."""
        ref = getattr(self, "ref_policy", None)
        if ref is not None:
            yield ref
        elif self.reference_is_base:
            with adapter_disabled(self.policy) as base:
                yield base
        else:
            raise RuntimeError(f"{type(self).__name__} has no reference model")

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
