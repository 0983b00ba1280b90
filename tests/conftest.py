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


@pytest.fixture(scope="session")
def demo_workspace(tmp_path_factory):
    """A working directory laid out like a real one, with everything small.

    ``data/demo`` (a small demo task with its own tokenizer), ``runs/demo/sft/hf`` (a
    tiny untrained policy export) and ``runs/demo/reward/hf`` (a tiny reward export),
    so every YAML in ``configs/`` runs unchanged from this directory.
    """
    from rlhf_lightning.data.demo import write_demo_data
    from rlhf_lightning.models import build_reward_model, load_causal_lm, load_tokenizer, save_hf

    root = tmp_path_factory.mktemp("workspace")
    write_demo_data(root / "data/demo", seed=0, n_sft=64, n_pairs=48, n_val_pairs=16, n_prompts=32, n_heldout=16)
    tok = load_tokenizer(str(root / "data/demo/tokenizer"))
    torch.manual_seed(0)
    policy = load_causal_lm(None, tok, model_config=dict(TINY_MODEL_CONFIG))
    save_hf(policy, tok, root / "runs/demo/sft/hf")
    rm = build_reward_model(str(root / "runs/demo/sft/hf"), tok)
    rm.save_pretrained(root / "runs/demo/reward/hf", tok)
    return root


def quiet_trainer(tmp_path, **kw):
    """A CPU Trainer with no logger, checkpoints, progress bar or validation; ``kw`` overrides."""
    import lightning as L

    opts = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
    )
    return L.Trainer(**{**opts, **kw})
