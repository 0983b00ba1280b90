"""Tiny random configs of the decoder architectures researchers point the stages at.

Field names are those of ``transformers`` 5 (``configuration_<arch>.py``). Each model is
two layers and 32 wide, with settings that make the architecture's peculiarities bite on
sequences of 10-20 tokens: a sliding window of 8 (Mistral, Gemma), logit soft-capping
strong enough to change log-probs visibly (Gemma 2), QK-norm (Qwen 3, OLMo 2), grouped
KV heads, tied embeddings (GPT-2, Gemma), and a head not called ``lm_head`` (GPT-NeoX's
``embed_out``). Sizes come from the tokenizer (``models.build_config``).
"""

from __future__ import annotations

_COMMON = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 128,
}

ARCH_CONFIGS: dict[str, dict] = {
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128},
    "llama": {"model_type": "llama", **_COMMON, "num_key_value_heads": 2},
    "qwen2": {"model_type": "qwen2", **_COMMON, "num_key_value_heads": 2},
    "qwen3": {"model_type": "qwen3", **_COMMON, "num_key_value_heads": 2, "head_dim": 8},
    "pythia": {"model_type": "gpt_neox", **_COMMON, "rotary_pct": 0.25},
    "mistral": {"model_type": "mistral", **_COMMON, "num_key_value_heads": 2, "sliding_window": 8},
    "gemma2": {
        "model_type": "gemma2",
        **_COMMON,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "query_pre_attn_scalar": 8,
        "sliding_window": 8,
        "final_logit_softcapping": 2.0,
        "attn_logit_softcapping": 5.0,
    },
    "gemma3": {
        "model_type": "gemma3_text",
        **_COMMON,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "query_pre_attn_scalar": 8,
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "phi3": {"model_type": "phi3", **_COMMON, "num_key_value_heads": 2},
    "olmo2": {"model_type": "olmo2", **_COMMON, "num_key_value_heads": 2},
}
