"""The scalar reward model and the value head.

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
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from rlhf_lightning.models.adapters import is_adapter_dir, load_merged
from rlhf_lightning.models.forward import last_token_index, position_ids_from_mask
from rlhf_lightning.models.loading import build_config, check_source, resize_for_tokenizer

log = logging.getLogger(__name__)

# Config attributes that carry the reward normalisation inside the export's config.json.
REWARD_GAIN_KEY = "rlhf_reward_gain"
REWARD_BIAS_KEY = "rlhf_reward_bias"


class RewardModel(nn.Module):
    """A scalar reward model: a ``*ForSequenceClassification`` (one label) plus score normalisation.

    ``forward`` returns the (normalised, when ``normalize``) score read at the last real
    token of each row; ``token_scores`` returns the head's output at every position, which
    is what a critic initialised from the reward model uses as per-token values.
    """

    # Entry points besides ``forward`` that gather the weights when the model is sharded
    # (``models.sharding.shard``); a method they call must not be listed as well.
    fsdp_forward_methods: tuple[str, ...] = ()

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

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool | None = None
    ) -> torch.Tensor:
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
    if is_adapter_dir(name_or_path):  # an adapter-only SFT export: its base with the adapter merged in
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the new score head is reported as missing: expected
        try:
            model = load_merged(
                name_or_path, AutoModelForSequenceClassification, num_labels=1, trust_remote_code=trust_remote_code
            )
        finally:
            hf_logging.set_verbosity(verbosity)
    elif name_or_path is not None:
        check_source(name_or_path, "model")
        # A causal LM's lm_head is dropped and the score head is new: transformers reports both
        # as a loading problem. Expected here, so check the other keys ourselves instead.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                os.fspath(name_or_path), num_labels=1, trust_remote_code=trust_remote_code, output_loading_info=True
            )
        finally:
            hf_logging.set_verbosity(verbosity)
        missing = [k for k in info["missing_keys"] if not k.startswith("score.")]
        # The LM head is whatever lies outside the backbone: lm_head, GPT-NeoX's embed_out, ...
        backbone = f"{model.base_model_prefix}."
        unexpected = [k for k in info["unexpected_keys"] if k.startswith(backbone)]
        if missing or unexpected or info["mismatched_keys"]:
            log.warning(
                "%s: backbone weights missing %s, unexpected %s, mismatched %s",
                name_or_path,
                missing,
                unexpected,
                info["mismatched_keys"],
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
    check_source(path, "reward model")
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
