"""LoRA adapters (the ``peft`` library): adding them, switching them off, exporting them.

A model given to :func:`add_lora` stays the very same ``transformers`` model: the LoRA
layers are injected in place (``peft.get_peft_model`` wraps it, and the wrapper is kept
beside the model, not around it), so ``response_logprobs``, generation, gradient
checkpointing and the reward head see the class they expect. Only the adapter weights
(and ``modules_to_save``, e.g. the reward model's score head) require gradients.

* **reference** — :func:`adapter_disabled` runs the model with its adapter off: that is
  the frozen base the policy started from, with no second copy in memory;
* **export** — :func:`merged_copy` gives a plain ``transformers`` model with the adapter
  folded into the weights (the default export: the next stage's base *is* this policy);
  :func:`save_adapter` writes the adapter alone (``adapter_config.json`` +
  ``adapter_model.safetensors``) for ``peft.PeftModel.from_pretrained``;
* **loading** — :func:`load_merged` reads an adapter-only export back as a plain model
  (base + adapter, merged), so a stage that starts from one starts from the adapted
  policy, never silently from the bare base.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

ADAPTER_CONFIG = "adapter_config.json"
# Where the injected model keeps its peft wrapper (a plain attribute: not a submodule).
_WRAPPER_ATTR = "_rlhf_peft_model"


@dataclass
class LoraSettings:
    """LoRA on every trainable model of a stage (policy, reward model, separate critic).

    Args:
        r: rank of the update ``B @ A``.
        alpha: scaling numerator; the update is multiplied by ``alpha / r``.
        dropout: dropout on the adapter's input (zeroed with the rest when the stage
            turns dropout off, as DPO and the online-RL stages do).
        target_modules: ``"all-linear"`` (every linear layer but the output head), or
            module names such as ``[q_proj, k_proj, v_proj, o_proj]``.
        modules_to_save: modules trained in full beside the adapter; a reward model or
            critic adds its score head by itself.
        export: ``"merged"`` (default): the HF export holds the adapter folded into the
            base weights, a plain model for the next stage; ``"adapter"``: the adapter alone
            (plus tokenizer), loadable with ``peft`` on top of this stage's base.
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    modules_to_save: list[str] | None = None
    export: str = "merged"

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")
        if self.export not in ("merged", "adapter"):
            raise ValueError(f"lora.export must be 'merged' or 'adapter', got {self.export!r}")

    @classmethod
    def coerce(cls, value: LoraSettings | dict[str, Any] | None) -> LoraSettings | None:
        """Accept the settings, a mapping of them (YAML, a checkpoint's hyperparameters) or None."""
        if value is None or isinstance(value, LoraSettings):
            return value
        return cls(**dict(value))


def hf_model(model: nn.Module) -> PreTrainedModel:
    """The ``transformers`` model itself, or the one a wrapper (``RewardModel``) holds as ``.model``."""
    return model if isinstance(model, PreTrainedModel) else model.model


def add_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Inject LoRA layers into ``model`` in place and freeze everything but them; returns ``model``.

    A ``*ForSequenceClassification`` model (reward model, critic) is a ``SEQ_CLS`` task for
    ``peft``: its score head is trained in full and saved with the adapter.
    """
    from peft import LoraConfig

    hf = hf_model(model)
    if lora_wrapper(hf) is not None:
        raise ValueError(f"{type(hf).__name__} already carries a LoRA adapter")
    seq_cls = type(hf).__name__.endswith("ForSequenceClassification")
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        modules_to_save=list(settings.modules_to_save) if settings.modules_to_save else None,
        task_type="SEQ_CLS" if seq_cls else "CAUSAL_LM",
    )
    _inject(hf, config)
    return model


def _inject(hf: PreTrainedModel, config) -> None:
    """Adapt ``hf`` in place with the peft ``config``, its wrapper kept beside it."""
    from peft import get_peft_model

    wrapper = get_peft_model(hf, config)
    if wrapper.base_model.model is not hf:  # the whole design relies on injection in place
        raise RuntimeError("peft did not adapt the model in place")
    hf.__dict__[_WRAPPER_ATTR] = wrapper  # beside the model, not a submodule (no cycle, no state-dict keys)


def copy_lora(source: nn.Module, target: nn.Module) -> nn.Module:
    """Inject into ``target`` (a fresh model of ``source``'s architecture) the adapter layers
    ``source`` carries, same ``peft`` config, so that ``source``'s state dict loads into it."""
    wrapper = lora_wrapper(source)
    if wrapper is None:
        raise ValueError(f"{type(source).__name__} has no LoRA adapter to copy")
    _inject(hf_model(target), copy.deepcopy(wrapper.peft_config["default"]))
    return target


def lora_wrapper(model: nn.Module):
    """The ``peft.PeftModel`` that owns ``model``'s adapter, or None when it has none."""
    try:
        hf = hf_model(model)
    except AttributeError:
        return None
    return hf.__dict__.get(_WRAPPER_ATTR)


def has_lora(model: nn.Module | None) -> bool:
    return model is not None and lora_wrapper(model) is not None


@contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base: adapter off, eval mode, no gradients; everything restored after.

    This is the frozen reference of a LoRA policy: the weights it started from, shared.
    """
    wrapper = lora_wrapper(model)
    if wrapper is None:
        raise ValueError(f"{type(model).__name__} has no LoRA adapter to disable")
    was_training = model.training
    model.eval()
    try:
        with wrapper.disable_adapter(), torch.no_grad():
            yield model
    finally:
        model.train(was_training)


class AdapterDisabled(nn.Module):
    """A module view of ``model`` with its adapter off, for code that takes a model (evaluation).

    Create it when needed and do not register it on a system: it holds ``model``, whose
    weights must not appear twice in a state dict.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = model

    @property
    def config(self):
        return self.inner.config

    def forward(self, *args, **kwargs):
        with adapter_disabled(self.inner):
            return self.inner(*args, **kwargs)


def merged_copy(model: nn.Module) -> PreTrainedModel:
    """A plain ``transformers`` copy of ``model`` with the adapter folded into its weights.

    ``model`` is left as it is (training may go on); the copy costs one model's memory for
    as long as the caller keeps it. A model without an adapter is returned itself.
    """
    wrapper = lora_wrapper(model)
    if wrapper is None:
        return hf_model(model)
    merged = copy.deepcopy(wrapper).merge_and_unload()
    merged.__dict__.pop(_WRAPPER_ATTR, None)
    merged.__dict__.pop("peft_config", None)
    return merged


def save_adapter(model: nn.Module, path: str | Path, base_name_or_path: str | None) -> Path:
    """Write the adapter alone (``adapter_config.json``, ``adapter_model.safetensors``) to ``path``.

    ``base_name_or_path`` (the export or hub name this stage started from) is recorded in
    the adapter config: ``PeftModel.from_pretrained`` and :func:`load_merged` load it as the base.
    """
    wrapper = lora_wrapper(model)
    if wrapper is None:
        raise ValueError(f"{type(model).__name__} has no LoRA adapter to save")
    if base_name_or_path is None:
        raise ValueError(
            "lora.export='adapter' needs a base that can be loaded again: start the stage from "
            "an export or hub name (model=...), not from model_config, or export merged weights"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    base = os.fspath(base_name_or_path)
    if os.path.isdir(base):  # a local export: absolute, so that the adapter loads from any directory
        base = os.path.abspath(base)
    for config in wrapper.peft_config.values():
        config.base_model_name_or_path = base
    wrapper.save_pretrained(os.fspath(path), safe_serialization=True)
    return path


def is_adapter_dir(name_or_path: str | os.PathLike | None) -> bool:
    """Whether ``name_or_path`` is a local adapter-only export (an adapter config, no model config)."""
    if name_or_path is None:
        return False
    path = Path(name_or_path)
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def adapter_base(path: str | os.PathLike) -> str:
    """The base model an adapter-only export was trained on (from its adapter config)."""
    base = json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{path}: the adapter config names no base model (base_model_name_or_path)")
    return base


def load_merged(path: str | os.PathLike, auto_class, **kwargs) -> PreTrainedModel:
    """Base (``auto_class.from_pretrained`` of the adapter's base) + the adapter at ``path``, merged.

    A base that is itself an adapter-only export is merged first (stages stack).
    """
    from peft import PeftModel

    base_path = adapter_base(path)
    if is_adapter_dir(base_path):
        base = load_merged(base_path, auto_class, **kwargs)
    else:
        base = auto_class.from_pretrained(base_path, **kwargs)
    return PeftModel.from_pretrained(base, os.fspath(path)).merge_and_unload()


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, each shared tensor counted once."""
    params = list(module.parameters())  # parameters() yields a shared tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# LightningCLI stores the settings in hyperparameters: let checkpoints load with weights_only=True.
torch.serialization.add_safe_globals([LoraSettings])

__all__ = [
    "AdapterDisabled",
    "LoraSettings",
    "adapter_base",
    "adapter_disabled",
    "add_lora",
    "count_parameters",
    "has_lora",
    "hf_model",
    "is_adapter_dir",
    "load_merged",
    "lora_wrapper",
    "merged_copy",
    "save_adapter",
]
