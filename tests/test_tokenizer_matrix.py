"""The tokenizer matrix: conventions of real checkpoints' tokenizers, built in ``tests/tokenizer_conventions.py``.

No pad token, pad equal to EOS, a tokenizer (and a chat template) that adds BOS itself,
one that appends EOS, a ChatML template with a system role and a generation prompt, and
padding: right for training, left for generation, the same log-probs under both.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rlhf_lightning.data.collate import IGNORE_INDEX, tokenize_preference, tokenize_prompt, tokenize_sft
from rlhf_lightning.data.datamodules import PreferenceDataModule, PromptDataModule, SFTDataModule
from rlhf_lightning.data.records import Location, RecordError, load_examples, parse_preference, parse_prompt, parse_sft
from rlhf_lightning.models import load_causal_lm, load_tokenizer, response_logprobs
from rlhf_lightning.systems.sft import SFTModule
from tests.arch_configs import ARCH_CONFIGS
from tests.conftest import quiet_trainer
from tests.tokenizer_conventions import NO_SYSTEM_TEMPLATE, build

LOC = Location("chat.jsonl", 1)
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "The movie?"},
    {"role": "assistant", "content": "It was great."},
]


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    kinds = ("no_pad", "pad_is_eos", "bos_adder", "eos_adder", "chatml")
    return {kind: build(kind, root / kind) for kind in kinds}


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# ----------------------------------------------------------------------------- pad token
@pytest.mark.parametrize("kind", ["no_pad", "pad_is_eos"])
def test_a_dedicated_pad_is_added_with_a_clear_message(kind, tok_dirs, caplog):
    with caplog.at_level(logging.WARNING, logger="rlhf_lightning"):
        tok = load_tokenizer(tok_dirs[kind])
    assert tok.pad_token == "<pad>" and tok.pad_token_id == 300 == len(tok) - 1
    assert tok.pad_token_id != tok.eos_token_id
    why = "has no pad token" if kind == "no_pad" else "pads with its EOS token '</s>'"
    assert why in caplog.text and "fewer than 301 embedding rows is resized" in caplog.text, caplog.text
    if kind == "pad_is_eos":
        assert "learning to stop" in caplog.text


def test_missing_pad_grows_a_tied_model_that_then_trains_and_exports(tok_dirs, tmp_path):
    # An export sized to the tokenizer as published (300 tokens, no pad), tied like GPT-2.
    base = tmp_path / "base"
    config = AutoConfig.for_model(**{**ARCH_CONFIGS["gpt2"], "vocab_size": 300})
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    for f in Path(tok_dirs["no_pad"]).iterdir():
        shutil.copy(f, base / f.name)
    records = [{"prompt": "The movie was", "response": " great."}] * 4
    data = SFTDataModule(tokenizer=str(base), train_file=write(tmp_path / "sft.jsonl", records), val_fraction=0.0)
    module = SFTModule(model=str(base))
    module.configure_model()
    emb = module.policy.get_input_embeddings()
    assert emb.num_embeddings == 301 and module.policy.get_output_embeddings().weight is emb.weight
    before = emb.weight.detach().clone()
    quiet_trainer(tmp_path, max_steps=1).fit(module, datamodule=data)
    assert torch.isfinite(emb.weight).all() and not torch.equal(emb.weight, before)
    module.export_hf(tmp_path / "sft")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "sft").eval()
    assert plain.config.vocab_size == 301 and plain.config.pad_token_id == 300
    assert load_tokenizer(str(tmp_path / "sft")).pad_token_id == 300  # the export carries the added pad
    ids = torch.tensor([module.tokenizer("The movie was great.").input_ids])
    module.policy.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, module.policy(input_ids=ids).logits, rtol=0, atol=0)


def test_pad_equal_to_eos_still_learns_eos(tok_dirs, tmp_path):
    records = [{"prompt": "The movie was", "response": " great."}, {"prompt": "A terrible", "response": " script."}]
    data = SFTDataModule(
        tokenizer=tok_dirs["pad_is_eos"], train_file=write(tmp_path / "s.jsonl", records * 2), val_fraction=0.0
    )
    data.setup("fit")
    tok = data.tokenizer
    batch = next(iter(data.train_dataloader()))  # (B, T) right-padded
    eos, pad = tok.eos_token_id, tok.pad_token_id
    last = batch["attention_mask"].sum(-1) - 1  # (B,) index of each row's last real token
    rows = torch.arange(len(last))
    # Every response ends with EOS, and that EOS is a label (scored), while padding is not.
    assert (batch["input_ids"][rows, last] == eos).all() and (batch["labels"][rows, last] == eos).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == pad).all() and pad != eos


# ----------------------------------------------------------------------------- BOS and EOS added by the tokenizer
@pytest.mark.parametrize("kind", ["bos_adder", "eos_adder"])
def test_no_double_bos_and_no_eos_inside_any_record(kind, tok_dirs):
    tok = load_tokenizer(tok_dirs[kind])
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert tok("The movie").input_ids[0] == bos  # the tokenizer adds BOS itself
    # The chat template writes BOS as text as well: still one BOS, at the start, in every kind of record.
    sft = tokenize_sft(parse_sft({"messages": CHAT}, LOC, tok), tok, 64, 64)
    plain_sft = tokenize_sft(parse_sft({"prompt": "The movie", "response": " was great."}, LOC, tok), tok, 64, 64)
    pref_record = {"prompt": CHAT[:2], "chosen": CHAT[2:], "rejected": [{"role": "assistant", "content": "Bad."}]}
    pref = tokenize_preference(parse_preference(pref_record, LOC, tok), tok, 64, 64)
    prompt = tokenize_prompt(parse_prompt({"messages": CHAT[:2]}, LOC, tok), tok, 64)
    sequences = [sft["input_ids"], plain_sft["input_ids"], pref["chosen_input_ids"], pref["rejected_input_ids"]]
    for ids in sequences:
        assert ids[0] == bos and bos not in ids[1:]
        assert ids[-1] == eos and eos not in ids[:-1]  # EOS ends the response only, never the prompt
    assert prompt["input_ids"][0] == bos and bos not in prompt["input_ids"][1:] and eos not in prompt["input_ids"]
    # Left truncation keeps the single BOS.
    short = tokenize_prompt(parse_prompt({"messages": CHAT[:2]}, LOC, tok), tok, 5)["input_ids"]
    assert len(short) == 5 and short[0] == bos and short[1:] == prompt["input_ids"][-4:]


def test_a_prompt_that_ends_with_eos_text_keeps_it(tok_dirs):
    tok = load_tokenizer(tok_dirs["eos_adder"])
    ids = tokenize_prompt(parse_prompt({"prompt": "The movie</s>"}, LOC, tok), tok, 64)["input_ids"]
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1


# ----------------------------------------------------------------------------- chat templates
@pytest.mark.parametrize("kind", ["chatml", "bos_adder"])
def test_chat_records_match_the_template_and_score_only_the_reply(kind, tok_dirs):
    tok = load_tokenizer(tok_dirs[kind])
    example = parse_sft({"messages": CHAT}, LOC, tok)
    assert "Be brief." in example.prompt and example.prompt.endswith(
        "<|im_start|>assistant\n" if kind == "chatml" else "[/INST]"
    )
    out = tokenize_sft(example, tok, 64, 64)
    # prompt + reply + EOS is exactly the template's own rendering of the conversation, up to the reply's end
    # (ChatML ends the turn with <|im_end|> = EOS; the BOS template puts a space before the reply).
    reference = tok.apply_chat_template(CHAT, tokenize=True)["input_ids"]
    assert out["input_ids"] == reference[: len(out["input_ids"])]
    scored = [t for t in out["labels"] if t != IGNORE_INDEX]
    n_prompt = len(tok(example.prompt).input_ids) - (kind == "bos_adder")  # the template's BOS collapses
    assert out["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert tok.decode(scored, skip_special_tokens=True).strip() == "It was great." and scored[-1] == tok.eos_token_id
    # Generation prompts open the assistant turn exactly as the training prompts do.
    prompt = tokenize_prompt(parse_prompt({"messages": CHAT[:2]}, LOC, tok), tok, 64)["input_ids"]
    assert prompt == out["input_ids"][: len(prompt)] and out["labels"][len(prompt)] != IGNORE_INDEX


def test_a_template_that_rejects_the_system_role_names_the_record(tok_dirs, tmp_path):
    tok = load_tokenizer(tok_dirs["chatml"])
    tok.chat_template = NO_SYSTEM_TEMPLATE
    path = write(tmp_path / "chat.jsonl", [{"messages": CHAT[1:]}, {"messages": CHAT}])
    with pytest.raises(RecordError, match=r"chat.jsonl:2: the tokenizer's chat template rejects .*System role"):
        load_examples(path, "sft", tok)
    (kept,) = load_examples(path, "sft", tok, strict=False)
    assert kept.prompt.endswith("<start_of_turn>model\n") and kept.response == "It was great."


# ----------------------------------------------------------------------------- padding sides
def test_training_right_generation_left_logprobs_equal(tok_dirs, tmp_path):
    # The ChatML tokenizer is saved with padding_side="left": each DataModule pads as its use requires.
    dirs = tok_dirs["chatml"]
    pairs = [{"prompt": CHAT[:2], "chosen": CHAT[2:], "rejected": [{"role": "assistant", "content": "No."}]}] * 2
    pairs.append({"prompt": "The movie was great and the acting was", "chosen": " wonderful.", "rejected": " bad."})
    pref = PreferenceDataModule(tokenizer=dirs, train_file=write(tmp_path / "p.jsonl", pairs), val_fraction=0.0)
    prompts = PromptDataModule(tokenizer=dirs, train_file=write(tmp_path / "q.jsonl", pairs), val_fraction=0.0)
    chats = [{"messages": CHAT}, {"messages": CHAT[1:]}]
    sft = SFTDataModule(tokenizer=dirs, train_file=write(tmp_path / "s.jsonl", chats), val_fraction=0.0)
    for dm in (pref, prompts, sft):
        dm.setup("fit")
    train = next(iter(pref.train_dataloader()))  # (2B, T)
    gen = next(iter(prompts.train_dataloader()))  # (B, Q)
    assert (train["attention_mask"][:, 0] == 1).all() and (train["attention_mask"][:, -1] == 0).any()  # right
    assert (gen["attention_mask"][:, -1] == 1).all() and (gen["attention_mask"][:, 0] == 0).any()  # left
    assert (next(iter(sft.train_dataloader()))["attention_mask"][:, 0] == 1).all()
    # The same sequences scored right-padded (training) and left-padded (rollouts): the same log-probs.
    tok = pref.tokenizer
    torch.manual_seed(0)
    model = load_causal_lm(None, tok, model_config=dict(ARCH_CONFIGS["qwen2"])).eval()
    mask = train["attention_mask"]  # (2B, T)
    lengths = mask.sum(-1)  # (2B,)
    T = mask.shape[1]
    shift = T - lengths  # (2B,) how far each row moves right when padded on the left
    cols = (torch.arange(T)[None] - shift[:, None]) % T  # (2B, T) source column of each left-padded column
    left_ids = train["input_ids"].gather(1, cols)  # (2B, T)
    left_mask = mask.gather(1, cols)  # (2B, T)
    assert (left_mask[:, -1] == 1).all()
    with torch.no_grad():
        right = response_logprobs(model, train["input_ids"], mask, 1).logprobs  # (2B, T - 1)
        left = response_logprobs(model, left_ids, left_mask, 1).logprobs  # (2B, T - 1)
    for row, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(left[row, T - n :], right[row, : n - 1], atol=1e-5, rtol=1e-5)
