"""Training a small byte-level BPE tokenizer on local text and wrapping it for ``transformers``.

Used by the demo task and by tests: nothing can be downloaded here, so a model trained
from scratch needs a tokenizer trained from the data it will see. The result is a
``PreTrainedTokenizerFast`` with distinct pad, BOS, EOS and unknown tokens that
``save_pretrained`` / ``AutoTokenizer.from_pretrained`` round-trip.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"

# A minimal chat template so that `{"messages": [...]}` records work with the trained tokenizer.
# Each turn is "<role>: <content>\n"; the generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 2000,
    min_frequency: int = 2,
    out_dir: str | Path | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``.

    Args:
        texts: the corpus, one document per item.
        vocab_size: target vocabulary size, special tokens included.
        min_frequency: a merge must occur at least this often.
        out_dir: when given, ``save_pretrained`` the tokenizer there.

    Returns:
        A fast tokenizer that prepends BOS when ``add_special_tokens=True`` (EOS is
        appended by the data layer to responses, never by the tokenizer), pads on the
        right by default, and has ``pad_token != eos_token``.
    """
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast
