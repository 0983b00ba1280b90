"""Shared fixtures: a tokenizer trained here and tiny models built from configs (nothing downloaded)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest
import torch

torch.set_num_threads(2)

CORPUS = [
    "The movie was great and the acting was wonderful.",
    "I hated this film, the plot was boring and bad.",
    "Review: a fine story with a few slow scenes.",
    "My thoughts on this movie: it was not good at all.",
    "The music was lovely and the ending made me smile!",
    "A terrible script, weak actors and a dull ending.",
]

# A tiny Llama: two layers, 32 wide. Fast enough for many forward passes in tests.
TINY_MODEL_CONFIG = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from rlhf_lightning.data.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(CORPUS * 20, vocab_size=400, min_frequency=1, out_dir=path)
    return str(path)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from rlhf_lightning.models import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture()
def tiny_config():
    return dict(TINY_MODEL_CONFIG)


@pytest.fixture()
def tiny_lm(tokenizer, tiny_config):
    from rlhf_lightning.models import load_causal_lm

    torch.manual_seed(0)
    return load_causal_lm(None, tokenizer, model_config=tiny_config).eval()
