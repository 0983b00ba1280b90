"""The architecture matrix: every common decoder family through loading, scoring, export and generation.

Each architecture of ``tests/arch_configs.py`` is built tiny and random from its config.
The fast tests here check what every stage relies on: log-probs that do not depend on
padding (position ids, sliding windows), exports that plain ``transformers`` reloads to
the same logits (tied weights, heads named differently), the reward model's scalar head,
and generation by both engines. ``tests/test_arch_training.py`` runs each stage for a step.
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhf_lightning.generation import SamplingConfig, fast_loop_unsupported, hf_generate, sample_responses
from rlhf_lightning.generation.decode import decode_loop
from rlhf_lightning.models import (
    build_reward_model,
    load_causal_lm,
    load_reward_model,
    response_logprobs,
    save_hf,
)
from tests.arch_configs import ARCH_CONFIGS

TEXTS = [
    "The movie was great and the acting was wonderful. I hated this film, the plot was boring.",
    "A terrible script, weak actors.",
    "Review: a fine story with a few slow scenes.",
]


@pytest.fixture(scope="module", params=list(ARCH_CONFIGS))
def arch(request, tokenizer, tmp_path_factory):
    """``(name, model, export_dir)``: a tiny random model of one architecture and its export."""
    name = request.param
    torch.manual_seed(0)
    model = load_causal_lm(None, tokenizer, model_config=dict(ARCH_CONFIGS[name])).eval()
    export = tmp_path_factory.mktemp(f"arch_{name}")
    save_hf(model, tokenizer, export)
    return name, model, export


def padded(tokenizer, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True, padding_side=side)
    return enc.input_ids, enc.attention_mask  # (3, T) each


def naive_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1 of ONE unpadded sequence, from the model's own logits."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()  # (T, V)
    return logits[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)  # (T - 1,)


def test_sequences_are_longer_than_the_sliding_window(tokenizer):
    # The windowed archs (Mistral, Gemma) must see tokens fall out of the window.
    ids, mask = padded(tokenizer, "right")
    assert mask.sum(-1).max() > 2 * ARCH_CONFIGS["mistral"]["sliding_window"]


def test_logprobs_independent_of_padding_and_equal_to_naive(arch, tokenizer):
    name, model, _ = arch
    with torch.no_grad():
        right = response_logprobs(model, *padded(tokenizer, "right"), response_start=1).logprobs  # (3, T - 1)
        left = response_logprobs(model, *padded(tokenizer, "left"), response_start=1).logprobs  # (3, T - 1)
        lengths = padded(tokenizer, "right")[1].sum(-1).tolist()
        for i, n in enumerate(lengths):
            ids = padded(tokenizer, "right")[0][i, :n].tolist()
            naive = naive_logprobs(model, ids)  # (n - 1,)
            torch.testing.assert_close(right[i, : n - 1], naive, atol=1e-5, rtol=1e-5, msg=f"{name} right row {i}")
            torch.testing.assert_close(left[i, -(n - 1) :], naive, atol=1e-5, rtol=1e-5, msg=f"{name} left row {i}")


def test_export_reloads_with_plain_transformers(arch, tokenizer):
    name, model, export = arch
    plain = AutoModelForCausalLM.from_pretrained(export).eval()
    assert type(plain) is type(model)
    ids, mask = padded(tokenizer, "right")
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits  # (3, T, V)
        torch.testing.assert_close(plain(input_ids=ids, attention_mask=mask).logits, ours, rtol=0, atol=0)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == bool(ARCH_CONFIGS[name].get("tie_word_embeddings", name in ("gpt2", "gemma2", "gemma3")))
    assert (plain.get_output_embeddings().weight is plain.get_input_embeddings().weight) == tied
    reloaded_tok = AutoTokenizer.from_pretrained(export)
    assert reloaded_tok(TEXTS[0]).input_ids == tokenizer(TEXTS[0]).input_ids
    assert reloaded_tok.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id


def test_reward_head_reads_last_token_and_reloads(arch, tokenizer, tmp_path, caplog):
    name, model, export = arch
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="rlhf_lightning"):
        rm = build_reward_model(str(export), tokenizer).eval()
    # Only the causal LM's head (lm_head, GPT-NeoX's embed_out) is left behind: no warning.
    assert not [r for r in caplog.records if "backbone weights" in r.message], caplog.text
    backbone = rm.model.base_model.state_dict()
    for key, value in model.base_model.state_dict().items():
        torch.testing.assert_close(backbone[key], value, rtol=0, atol=0, msg=f"{name}: {key} not carried over")
    ids, mask = padded(tokenizer, "right")
    rm.save_pretrained(tmp_path / "rm", tokenizer)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        ours = rm(ids, mask)  # (3,)
        theirs = plain(input_ids=ids, attention_mask=mask).logits.squeeze(-1)  # (3,) read at the last non-pad token
        left = rm(*padded(tokenizer, "left"))  # (3,)
        reloaded = load_reward_model(tmp_path / "rm").eval()(ids, mask)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left, ours, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reloaded, ours, rtol=0, atol=0)


def test_generation_both_engines(arch, tokenizer):
    name, model, _ = arch
    ids, mask = padded(tokenizer, "left")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    greedy = SamplingConfig(max_new_tokens=12, do_sample=False, engine="auto")
    # Our decode loop supports every architecture of the matrix (sliding windows, soft-capping included)...
    assert fast_loop_unsupported(model, greedy) is None, name
    ours = decode_loop(model, ids, mask, None, pad, greedy)  # (3, 12)
    theirs = hf_generate(model, ids, mask, eos, pad, greedy)  # (3, <= 12)
    # ...and decodes exactly what generate decodes (greedy; up to generate's own early stop at EOS).
    width = theirs.shape[1]
    finished = (theirs == eos).any(-1)
    assert torch.equal(ours[~finished, :width], theirs[~finished]), name
    for row in finished.nonzero().flatten().tolist():
        stop = int((theirs[row] == eos).nonzero()[0]) + 1
        assert torch.equal(ours[row, :stop], theirs[row, :stop]), name
    torch.manual_seed(0)
    sampled = SamplingConfig(max_new_tokens=6, engine="auto")
    for engine in ("auto", "hf"):
        gen = sample_responses(model, ids, mask, eos, pad, SamplingConfig(max_new_tokens=6, engine=engine))
        assert gen.response_ids.shape[0] == 3 and 1 <= gen.response_ids.shape[1] <= sampled.max_new_tokens
        assert gen.response_mask[:, 0].all() and (gen.response_ids < len(tokenizer)).all()
        assert (gen.response_ids[gen.response_mask == 0] == pad).all()
    assert not model.training


def test_gemma2_soft_capping_changes_the_logits(tokenizer):
    # The log-prob checks above compare with the model's own logits; they guard a path that computes
    # logits from hidden states (chunked log-probs) only if Gemma 2's final soft-capping moves them.
    torch.manual_seed(0)
    model = load_causal_lm(None, tokenizer, model_config=dict(ARCH_CONFIGS["gemma2"])).eval()
    ids, mask = padded(tokenizer, "right")
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        uncapped = model.get_output_embeddings()(out.hidden_states[-1])  # (3, T, V)
    assert (out.logits.abs() <= ARCH_CONFIGS["gemma2"]["final_logit_softcapping"]).all()
    gap = (uncapped.log_softmax(-1) - out.logits.log_softmax(-1)).abs().max()
    assert gap > 1e-3, gap  # a hundred times the tolerance of those checks (1e-5)
