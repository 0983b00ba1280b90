"""Fixtures for tests/test_data.py: a small trained tokenizer and record-file writers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_lightning.data.tokenizer import train_tokenizer

SENTENCES = [
    "the movie was great and the actors were wonderful",
    "the film was terrible and the plot made no sense",
    "i loved every minute of this beautiful story",
    "a boring and slow film with a weak ending",
    "the cat sat on the mat",
    "the dog ran in the park",
    "how are you today",
    "i am fine thank you",
    "please tell me a story about a cat",
    "once upon a time there was a dog",
    "user: hello there\nassistant: hi, how can i help?",
    "system: be kind\nuser: tell me a joke\nassistant: why did the cat sit on the mat?",
    "Human: what is the capital of france? Assistant: paris is the capital.",
    "Human: can you help me? Assistant: yes, of course i can help you.",
    "the acting was bad but the music was good",
    "what a wonderful performance by the whole cast",
    "i would not watch this movie again",
    "an excellent film, highly recommended",
] * 2


@pytest.fixture(scope="session")
def data_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of a byte-level BPE tokenizer trained on ``SENTENCES`` (pad 0, bos 1, eos 2)."""
    out = tmp_path_factory.mktemp("data_tokenizer")
    train_tokenizer(SENTENCES, vocab_size=400, min_frequency=1, out_dir=out)
    return out


@pytest.fixture(scope="session")
def data_tokenizer(data_tokenizer_dir: Path):
    """The tokenizer of ``data_tokenizer_dir``, loaded as the DataModules load it."""
    from rlhf_lightning.models import load_tokenizer

    return load_tokenizer(str(data_tokenizer_dir))


def write_jsonl(path: Path, records: list) -> Path:
    """Write ``records`` one per line; a str item is written verbatim (for broken lines)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
