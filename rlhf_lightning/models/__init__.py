"""Modelling: loading, the reward model and value head, preparation (LoRA adapters included), and the
shared forward passes."""

from rlhf_lightning.models.adapters import (
    AdapterDisabled,
    LoraSettings,
    adapter_disabled,
    count_parameters,
    has_lora,
    merged_copy,
    save_adapter,
)
from rlhf_lightning.models.forward import (
    DEFAULT_CHUNK_SIZE,
    ResponseOutputs,
    causal_lm_logits,
    last_token_index,
    position_ids_from_mask,
    response_logprobs,
)
from rlhf_lightning.models.loading import (
    build_config,
    check_finite_weights,
    load_causal_lm,
    load_tokenizer,
    resize_for_tokenizer,
    save_hf,
)
from rlhf_lightning.models.prepare import disable_dropout, freeze, prepare_frozen, prepare_trainable
from rlhf_lightning.models.reward import (
    REWARD_BIAS_KEY,
    REWARD_GAIN_KEY,
    RewardModel,
    ValueHead,
    build_reward_model,
    init_score_head,
    load_reward_model,
)
from rlhf_lightning.models.sharding import full_parameters, gathered_copy, holds_shards, is_sharded, shard

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "AdapterDisabled",
    "LoraSettings",
    "adapter_disabled",
    "count_parameters",
    "has_lora",
    "merged_copy",
    "save_adapter",
    "REWARD_BIAS_KEY",
    "REWARD_GAIN_KEY",
    "ResponseOutputs",
    "RewardModel",
    "ValueHead",
    "build_config",
    "build_reward_model",
    "causal_lm_logits",
    "check_finite_weights",
    "disable_dropout",
    "freeze",
    "full_parameters",
    "gathered_copy",
    "holds_shards",
    "init_score_head",
    "is_sharded",
    "last_token_index",
    "load_causal_lm",
    "load_reward_model",
    "load_tokenizer",
    "position_ids_from_mask",
    "prepare_frozen",
    "prepare_trainable",
    "resize_for_tokenizer",
    "response_logprobs",
    "save_hf",
    "shard",
]
