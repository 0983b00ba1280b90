"""Loading tokenizers and causal LMs, and writing exports.

Every model comes from one of two places:

* ``name_or_path``: a hub name or a local directory, through the real
  ``from_pretrained`` path (``trust_remote_code`` stays off unless asked for);
* ``model_config``: a dict of ``transformers`` config fields (``model_type`` plus
  dimensions), for a model trained from scratch (the demo task, the tests).

A LoRA stage's adapter-only export (``lora.export: adapter``) loads as its base with the
adapter merged in: the next stage starts from (and takes as reference) the adapted policy.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rlhf_lightning.models.adapters import is_adapter_dir, load_merged

log = logging.getLogger(__name__)


def check_source(
    name_or_path: str | os.PathLike,
    what: str = "model",
    needs: tuple[str, ...] = ("config.json", "adapter_config.json"),
) -> None:
    """Fail with an actionable message when ``name_or_path`` is meant as a local export but is not one.

    A string that exists on disk, or that cannot be a hub id (an absolute or ``./`` path,
    more than one ``/``), is a local path: it must be a directory holding ``needs``. Hub
    names (``org/name``) are left to ``from_pretrained``. ``needs``: at least one of these files.
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    looks_local = path.exists() or text.startswith(("/", ".", "~")) or text.count("/") > 1 or os.sep * 2 in text
    if not looks_local:
        return
    if not path.exists():
        # Exports live at <run dir>/<stage>/hf: name the stage that writes this one.
        writer = f"the {path.parent.name!r} stage" if path.name == "hf" and path.parent.name else "an earlier stage"
        raise FileNotFoundError(
            f"{what} path {text} does not exist. It should be an export directory (config.json, weights, "
            f"tokenizer) written by {writer}; run that stage first or fix the path."
        )
    if not path.is_dir():
        raise NotADirectoryError(f"{what} path {text} is a file; give the export directory that holds it")
    if not any(path.iterdir()):
        raise FileNotFoundError(f"{what} directory {text} is empty: the stage that writes it has not finished")
    if needs and not any((path / name).exists() for name in needs):
        present = ", ".join(sorted(p.name for p in path.iterdir())[:8])
        raise FileNotFoundError(
            f"{what} directory {text} holds no {' or '.join(needs)} (it has: {present}); is it an export?"
        )


def load_tokenizer(
    name_or_path: str, trust_remote_code: bool = False, padding_side: str = "right"
) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a hub name or a local directory and make it safe for RLHF.

    A tokenizer without a pad token, or whose pad token equals EOS, gets a dedicated
    ``<pad>`` token added (the model's embeddings must then be resized: see
    ``resize_for_tokenizer``). Pad == EOS would mask every EOS out of the loss, and the
    model would never learn to stop.
    """
    check_source(name_or_path, "tokenizer", needs=("tokenizer_config.json", "tokenizer.json", "config.json"))
    tok = AutoTokenizer.from_pretrained(os.fspath(name_or_path), trust_remote_code=trust_remote_code)
    if tok.eos_token is None:
        raise ValueError(f"tokenizer {name_or_path!r} has no EOS token; set one before training")
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        problem = (
            "has no pad token"
            if tok.pad_token is None
            else f"pads with its EOS token {tok.eos_token!r}, which would hide every EOS among the padding and "
            "keep the model from learning to stop"
        )
        n = len(tok)
        tok.add_special_tokens({"pad_token": "<pad>"})
        grown = f"; a model with fewer than {len(tok)} embedding rows is resized to match" if len(tok) > n else ""
        log.warning(
            "tokenizer %s %s: added a dedicated pad token %r (id %d)%s",
            name_or_path,
            problem,
            tok.pad_token,
            tok.pad_token_id,
            grown,
        )
    tok.padding_side = padding_side
    return tok


def build_config(model_config: dict[str, Any], tokenizer: PreTrainedTokenizerBase, num_labels: int | None = None):
    """A ``transformers`` config from a dict (``model_type`` defaults to ``llama``), sized to ``tokenizer``."""
    fields = dict(model_config)
    model_type = fields.pop("model_type", "llama")
    fields.update(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if num_labels is not None:
        fields["num_labels"] = num_labels
    return AutoConfig.for_model(model_type, **fields)


def resize_for_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow the embeddings when the tokenizer gained tokens (a pad token, say), and record the special ids."""
    n = len(tokenizer)
    if model.get_input_embeddings().num_embeddings < n:
        log.warning("resizing embeddings from %d to %d tokens", model.get_input_embeddings().num_embeddings, n)
        model.resize_token_embeddings(n, mean_resizing=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id


def load_causal_lm(
    name_or_path: str | None,
    tokenizer: PreTrainedTokenizerBase,
    model_config: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    """A causal LM from a hub name / local directory, or built fresh from ``model_config``."""
    if (name_or_path is None) == (model_config is None):
        raise ValueError("give exactly one of a model name/path or a model_config")
    if name_or_path is not None:
        check_source(name_or_path, "model")
    if is_adapter_dir(name_or_path):
        log.info("%s is an adapter-only export: loading its base with the adapter merged in", name_or_path)
        model = load_merged(name_or_path, AutoModelForCausalLM, trust_remote_code=trust_remote_code, dtype=dtype)
    elif name_or_path is not None:
        model = AutoModelForCausalLM.from_pretrained(
            os.fspath(name_or_path), trust_remote_code=trust_remote_code, dtype=dtype
        )
    else:
        model = AutoModelForCausalLM.from_config(build_config(model_config, tokenizer), dtype=dtype)
    resize_for_tokenizer(model, tokenizer)
    return model


def check_finite_weights(model: torch.nn.Module, what: str) -> None:
    """Raise when a weight of ``model`` holds inf or NaN (a diverged run must not become an export)."""
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise ValueError(
                f"refusing to export {what}: weight {name!r} holds non-finite values (the run diverged); "
                "resume from an earlier checkpoint with a lower learning rate"
            )


def save_hf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path) -> Path:
    """``save_pretrained`` model (safetensors) and tokenizer into ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(os.fspath(path), safe_serialization=True)
    tokenizer.save_pretrained(os.fspath(path))
    return path
