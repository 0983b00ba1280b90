"""Preparing models for their role: a trainable policy or critic, or a frozen reference or scorer."""

from __future__ import annotations

from torch import nn

from rlhf_lightning.models.adapters import LoraSettings, add_lora, hf_model

# Config fields that attention implementations read instead of an nn.Dropout module.
_DROPOUT_CONFIG_KEYS = ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout")


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability to 0 (modules and the config fields attention code reads)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    if config is not None:
        for key in _DROPOUT_CONFIG_KEYS:
            if isinstance(getattr(config, key, None), float):
                setattr(config, key, 0.0)
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: for the reference policy and the reward model."""
    model.eval()
    model.requires_grad_(False)
    return model


def prepare_trainable(
    model: nn.Module,
    no_dropout: bool = True,
    gradient_checkpointing: bool = False,
    lora: LoraSettings | None = None,
) -> nn.Module:
    """Train mode, optionally with LoRA adapters, without dropout and with gradient checkpointing.

    ``from_pretrained`` returns eval mode and Lightning keeps each module's mode, so a
    model loaded from an export must be put in train mode here: gradient checkpointing
    acts only in train mode. ``model`` may be a ``PreTrainedModel`` or a wrapper whose
    ``.model`` is one (the reward model).

    With ``lora`` only the adapter (and ``modules_to_save``) trains; the adapter goes in
    first, so that ``no_dropout`` zeroes its dropout too.
    """
    if lora is not None:
        add_lora(model, lora)
    model.train()
    if no_dropout:
        disable_dropout(model)
    if gradient_checkpointing:
        # transformers also makes the (frozen) embeddings' output require a gradient, so the
        # adapters inside checkpointed blocks get theirs.
        hf_model(model).gradient_checkpointing_enable()
    return model


def prepare_frozen(model: nn.Module, no_dropout: bool = True) -> nn.Module:
    """A frozen model (reference, reward model): dropout off when asked, eval mode, no gradients."""
    if no_dropout:
        disable_dropout(model)
    return freeze(model)
