"""Loading tokenizers and models, the reward model, the value head, and freezing.

Every model comes from one of two places:

* ``name_or_path``: a hub name or a local directory, through the real
  ``from_pretrained`` path (``trust_remote_code`` stays off unless asked for);
* ``model_config``: a dict of ``transformers`` config fields (``model_type`` plus
  dimensions), for a model trained from scratch (the demo task, the tests).

The reward model is a ``*ForSequenceClassification`` model with one label, so its
``save_pretrained`` export loads with ``AutoModelForSequenceClassification`` anywhere;
``RewardModel`` wraps it to read the score at the last non-pad token and to apply the
score normalisation stored in the export's config.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

log = logging.getLogger(__name__)

# Config attributes that carry the reward normalisation inside the export's config.json.
REWARD_GAIN_KEY = "rlhf_reward_gain"
REWARD_BIAS_KEY = "rlhf_reward_bias"


def load_tokenizer(
    name_or_path: str, trust_remote_code: bool = False, padding_side: str = "right"
) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a hub name or a local directory and make it safe for RLHF.

    A tokenizer without a pad token, or whose pad token equals EOS, gets a dedicated
    ``<pad>`` token added (the model's embeddings must then be resized: see
    ``resize_for_tokenizer``). Pad == EOS would mask every EOS out of the loss, and the
    model would never learn to stop.
    """
    tok = AutoTokenizer.from_pretrained(os.fspath(name_or_path), trust_remote_code=trust_remote_code)
    if tok.eos_token is None:
        raise ValueError(f"tokenizer {name_or_path!r} has no EOS token; set one before training")
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        old = tok.pad_token
        tok.add_special_tokens({"pad_token": "<pad>"})
        log.warning(
            "tokenizer %s: pad token was %r (missing or equal to EOS); added a dedicated %r (id %d)",
            name_or_path, old, tok.pad_token, tok.pad_token_id,
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
        model = AutoModelForCausalLM.from_pretrained(
            os.fspath(name_or_path), trust_remote_code=trust_remote_code, dtype=dtype
        )
    else:
        model = AutoModelForCausalLM.from_config(build_config(model_config, tokenizer), dtype=dtype)
    resize_for_tokenizer(model, tokenizer)
    return model


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability to 0 (modules and the config fields attention code reads)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    if config is not None:
        for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
            if isinstance(getattr(config, key, None), float):
                setattr(config, key, 0.0)
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: for the reference policy and the reward model."""
    model.eval()
    model.requires_grad_(False)
    return model


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


def causal_lm_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
    """Logits of a causal LM under any padding, with position ids derived from the mask."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        **kwargs,
    )
    return out.logits  # (B, T, V)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (works for left and right padding)."""
    T = attention_mask.shape[-1]
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)  # (B, T)
    return (positions * attention_mask.long()).argmax(-1)  # (B,)


class RewardModel(nn.Module):
    """A scalar reward model: a ``*ForSequenceClassification`` (one label) plus score normalisation.

    ``forward`` returns the (normalised, when ``normalize``) score read at the last real
    token of each row; ``token_scores`` returns the head's output at every position, which
    is what a critic initialised from the reward model uses as per-token values.
    """

    def __init__(self, model: PreTrainedModel, normalize: bool = True):
        super().__init__()
        self.model = model
        self.normalize = normalize

    @property
    def config(self):
        return self.model.config

    @property
    def gain(self) -> float:
        return float(getattr(self.config, REWARD_GAIN_KEY, 1.0) or 1.0)

    @property
    def bias(self) -> float:
        return float(getattr(self.config, REWARD_BIAS_KEY, 0.0) or 0.0)

    def set_normalization(self, gain: float, bias: float) -> None:
        """Store ``score = gain * raw + bias``; saved with the export's config."""
        setattr(self.config, REWARD_GAIN_KEY, float(gain))
        setattr(self.config, REWARD_BIAS_KEY, float(bias))

    def token_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Raw head outputs at every position (never normalised)."""
        backbone = self.model.base_model
        hidden = backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        ).last_hidden_state  # (B, T, H)
        return self.model.score(hidden).squeeze(-1)  # (B, T)

    def token_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Head outputs at every position on the reward's scale (normalised when ``normalize``).

        A critic initialised from the reward model uses these as values, so that at step 0
        its value at the last token already predicts the (normalised) score PPO is given.
        """
        scores = self.token_scores(input_ids, attention_mask)  # (B, T)
        return scores * self.gain + self.bias if self.normalize else scores

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool | None = None) -> torch.Tensor:
        scores = self.token_scores(input_ids, attention_mask)  # (B, T)
        raw = scores.gather(-1, last_token_index(attention_mask).unsqueeze(-1)).squeeze(-1)  # (B,)
        if self.normalize if normalize is None else normalize:
            return raw * self.gain + self.bias
        return raw

    def save_pretrained(self, path: str | Path, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        self.model.save_pretrained(os.fspath(path))
        if tokenizer is not None:
            tokenizer.save_pretrained(os.fspath(path))


def init_score_head(head: nn.Linear) -> None:
    """Reward head init N(0, 1/sqrt(d+1)) (std), as in the InstructGPT-era reward models."""
    nn.init.normal_(head.weight, std=1.0 / math.sqrt(head.in_features + 1))
    if head.bias is not None:
        nn.init.zeros_(head.bias)


def build_reward_model(
    name_or_path: str | None,
    tokenizer: PreTrainedTokenizerBase,
    model_config: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> RewardModel:
    """A new reward model on top of a causal LM (an SFT export, a hub name) or a fresh config.

    The backbone weights come from the LM; the score head is newly initialised. An
    existing reward-model export is loaded with ``load_reward_model`` instead.
    """
    if (name_or_path is None) == (model_config is None):
        raise ValueError("give exactly one of a model name/path or a model_config")
    if name_or_path is not None:
        model = AutoModelForSequenceClassification.from_pretrained(
            os.fspath(name_or_path), num_labels=1, trust_remote_code=trust_remote_code
        )
    else:
        model = AutoModelForSequenceClassification.from_config(build_config(model_config, tokenizer, num_labels=1))
    resize_for_tokenizer(model, tokenizer)
    init_score_head(model.score)
    # Clear any normalisation a checkpoint might carry: this is a new head.
    rm = RewardModel(model)
    rm.set_normalization(1.0, 0.0)
    return rm


def load_reward_model(path: str | Path, normalize: bool = True, trust_remote_code: bool = False) -> RewardModel:
    """Load a reward-model export (``AutoModelForSequenceClassification``, one label).

    The normalisation stored in its config (``rlhf_reward_gain``/``rlhf_reward_bias``) is
    applied by ``forward`` unless ``normalize=False``.
    """
    model = AutoModelForSequenceClassification.from_pretrained(
        os.fspath(path), num_labels=1, trust_remote_code=trust_remote_code
    )
    return RewardModel(model, normalize=normalize)


class ValueHead(nn.Module):
    """A scalar value head on a policy's last hidden states, zero-initialised.

    Zero init makes the first values 0 rather than noise, so the shared-head critic
    does not disturb the first advantages.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden).squeeze(-1)  # (B, T)


def save_hf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path) -> Path:
    """``save_pretrained`` model (safetensors) and tokenizer into ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(os.fspath(path), safe_serialization=True)
    tokenizer.save_pretrained(os.fspath(path))
    return path
