"""Model loading, export round trips, padding invariance and generation."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf_lightning.generation import SamplingConfig, mask_after_eos, sample_responses
from rlhf_lightning.models import (
    build_reward_model,
    causal_lm_logits,
    disable_dropout,
    freeze,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    save_hf,
)


def test_pad_differs_from_eos_and_is_added_when_missing(tokenizer, tmp_path):
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    # A tokenizer whose pad is its EOS (the GPT-2 habit) gets a dedicated pad token.
    tok = load_tokenizer(tokenizer.name_or_path)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(tmp_path)
    fixed = load_tokenizer(str(tmp_path))
    assert fixed.pad_token == "<pad>" and fixed.pad_token_id != fixed.eos_token_id


def test_resize_when_tokenizer_grows(tokenizer, tiny_config, tmp_path):
    model = load_causal_lm(None, tokenizer, model_config=tiny_config)
    n = model.get_input_embeddings().num_embeddings
    assert n == len(tokenizer)
    tok = load_tokenizer(tokenizer.name_or_path)
    tok.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    model2 = load_causal_lm(None, tok, model_config=tiny_config)
    assert model2.get_input_embeddings().num_embeddings == n + 1


def test_export_reload_identical_logits(tiny_lm, tokenizer, tmp_path):
    save_hf(tiny_lm, tokenizer, tmp_path / "hf")
    # The real from_pretrained path (local directory), both ours and plain transformers.
    reloaded = load_causal_lm(str(tmp_path / "hf"), load_tokenizer(str(tmp_path / "hf"))).eval()
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = torch.tensor([tokenizer("The movie was great").input_ids])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a = causal_lm_logits(tiny_lm, ids, mask)
        b = causal_lm_logits(reloaded, ids, mask)
        c = plain(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_logits_independent_of_left_and_right_padding(tiny_lm, tokenizer):
    ids = torch.tensor(tokenizer("I hated this film").input_ids)
    n, pad = len(ids), tokenizer.pad_token_id
    with torch.no_grad():
        ref = causal_lm_logits(tiny_lm, ids[None], torch.ones(1, n, dtype=torch.long))[0]
        right = causal_lm_logits(
            tiny_lm, torch.cat([ids, torch.full((3,), pad)])[None], torch.tensor([[1] * n + [0] * 3])
        )[0, :n]
        left = causal_lm_logits(
            tiny_lm, torch.cat([torch.full((3,), pad), ids])[None], torch.tensor([[0] * 3 + [1] * n])
        )[0, 3:]
    torch.testing.assert_close(right, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left, ref, atol=1e-5, rtol=1e-5)


def test_mask_after_eos():
    eos, pad = 2, 0
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 5, 5, 5, 5], [2, 9, 9, 9, 9]])
    gen = mask_after_eos(ids, eos, pad)
    assert gen.response_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert gen.response_ids.tolist() == [[5, 6, 2, 0, 0], [5, 5, 5, 5, 5], [2, 0, 0, 0, 0]]
    assert gen.ended.tolist() == [True, False, True]


def test_left_padded_greedy_generation_matches_single_prompt(tiny_lm, tokenizer):
    prompts = ["The movie was", "I hated this film, the plot was boring"]
    cfg = SamplingConfig(max_new_tokens=8, do_sample=False)
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    tokenizer.padding_side = "right"
    assert batch.attention_mask[0, 0] == 0  # the short prompt really is padded
    batched = sample_responses(
        tiny_lm, batch.input_ids, batch.attention_mask, tokenizer.eos_token_id, tokenizer.pad_token_id, cfg
    )
    for i, p in enumerate(prompts):
        ids = torch.tensor([tokenizer(p).input_ids])
        single = sample_responses(
            tiny_lm, ids, torch.ones_like(ids), tokenizer.eos_token_id, tokenizer.pad_token_id, cfg
        )
        n = int(single.response_mask.sum())
        assert batched.response_ids[i, :n].tolist() == single.response_ids[0, :n].tolist()


def test_generation_rejects_right_padding(tiny_lm, tokenizer):
    ids = torch.tensor([[5, 6, 0]])
    try:
        sample_responses(tiny_lm, ids, torch.tensor([[1, 1, 0]]), 2, 0)
    except ValueError as e:
        assert "left-padded" in str(e)
    else:
        raise AssertionError("right-padded prompts must be refused")


def test_freeze_and_disable_dropout(tokenizer, tiny_config):
    model = load_causal_lm(None, tokenizer, model_config={**tiny_config, "attention_dropout": 0.3})
    disable_dropout(model)
    assert model.config.attention_dropout == 0.0
    freeze(model)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_reward_model_export_loads_as_sequence_classifier(tiny_lm, tokenizer, tmp_path):
    save_hf(tiny_lm, tokenizer, tmp_path / "sft")
    rm = build_reward_model(str(tmp_path / "sft"), tokenizer).eval()
    # Backbone weights come from the SFT model.
    torch.testing.assert_close(rm.model.base_model.embed_tokens.weight, tiny_lm.model.embed_tokens.weight)
    rm.save_pretrained(tmp_path / "rm", tokenizer)
    auto = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm")).eval()
    loaded = load_reward_model(tmp_path / "rm").eval()
    batch = tokenizer(["The movie was great.", "Bad"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ours = rm(batch.input_ids, batch.attention_mask)
        theirs = auto(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.squeeze(-1)
        again = loaded(batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, again, atol=1e-6, rtol=1e-6)


def test_reward_normalization_saved_and_applied(tiny_lm, tokenizer, tmp_path):
    save_hf(tiny_lm, tokenizer, tmp_path / "sft")
    rm = build_reward_model(str(tmp_path / "sft"), tokenizer).eval()
    rm.set_normalization(gain=2.0, bias=-0.5)
    rm.save_pretrained(tmp_path / "rm", tokenizer)
    batch = tokenizer(["The movie was great."], return_tensors="pt")
    with torch.no_grad():
        raw = rm(batch.input_ids, batch.attention_mask, normalize=False)
        normed = load_reward_model(tmp_path / "rm")(batch.input_ids, batch.attention_mask)
        off = load_reward_model(tmp_path / "rm", normalize=False)(batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(normed, 2.0 * raw - 0.5)
    torch.testing.assert_close(off, raw)
