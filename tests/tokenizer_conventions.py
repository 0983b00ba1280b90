"""Tokenizers built here with the ``tokenizers`` library, one per convention real checkpoints follow.

Each is a byte-level BPE trained on a small corpus, wrapped as a ``PreTrainedTokenizerFast``
and saved, so that ``AutoTokenizer.from_pretrained`` (and thus ``models.load_tokenizer``)
reads it as it would read a hub checkpoint:

* ``no_pad``: BOS/EOS only, no pad token (GPT-2, Llama 2);
* ``pad_is_eos``: pad set to EOS (the usual "fix" for the above);
* ``bos_adder``: prepends BOS itself, and its chat template writes BOS too (Llama, Gemma);
* ``eos_adder``: appends EOS to every encoded text (Llama with ``add_eos_token``);
* ``chatml``: no BOS at all, a ChatML template with a system role and a generation
  prompt, EOS = ``<|im_end|>``, padding side saved as ``left`` (Qwen).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from tests.conftest import CORPUS

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Llama-2-like: BOS written by the template, system prompt folded into the first user turn.
BOS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}[SYS] {{ m['content'] }} [/SYS] "
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
# Gemma-like: a template that refuses the system role.
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _bpe(special: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        min_frequency=1,
        special_tokens=["<unk>", *special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 10, trainer=trainer)
    return tok


def build(kind: str, out_dir: str | Path) -> str:
    """Write the ``kind`` tokenizer (see the module docstring) to ``out_dir``; returns its path."""
    if kind == "chatml":
        tok = _bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>"
        )
        fast.chat_template = CHATML
        fast.padding_side = "left"
    else:
        tok = _bpe(["<s>", "</s>"])
        bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
        if kind in ("bos_adder", "pad_is_eos", "no_pad"):
            tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
        elif kind == "eos_adder":
            tok.post_processor = processors.TemplateProcessing(
                single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
            )
        else:
            raise ValueError(f"unknown tokenizer kind {kind!r}")
        pad = "</s>" if kind == "pad_is_eos" else None
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token=pad
        )
        fast.chat_template = BOS_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return str(out_dir)
