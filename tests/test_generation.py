"""Our decode loop against HF generate and against the maths: greedy parity, cached logits, the sampled distribution."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSeq2SeqLM
from transformers.cache_utils import Cache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from rlhf_lightning import generation
from rlhf_lightning.generation import (
    SamplingConfig,
    decode_loop,
    draw_tokens,
    fast_loop_unsupported,
    hf_generate,
    mask_after_eos,
    sample_responses,
    warp_logits,
)
from rlhf_lightning.models import causal_lm_logits, load_causal_lm

SMALL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 128,
}
ARCHS = {
    "llama": dict(model_type="llama", num_key_value_heads=2, **SMALL),
    "gpt2": dict(model_type="gpt2", n_layer=2, n_embd=32, n_head=4, n_positions=128),
    "gpt_neox": dict(model_type="gpt_neox", **SMALL),
    # sliding window, logit soft-capping, eager attention by default
    "gemma2": dict(model_type="gemma2", num_key_value_heads=2, head_dim=8, sliding_window=4, **SMALL),
}


def build(tokenizer, arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return load_causal_lm(None, tokenizer, model_config=dict(ARCHS[arch])).eval()


def left_padded(tokenizer, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of the given lengths, left-padded with the pad token."""
    g = torch.Generator().manual_seed(seed)
    Q = max(lengths)
    ids = torch.full((len(lengths), Q), tokenizer.pad_token_id)
    mask = torch.zeros(len(lengths), Q, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, Q - n :] = torch.randint(5, len(tokenizer) - 1, (n,), generator=g)
        mask[i, Q - n :] = 1
    return ids, mask


# ----------------------------------------------------------------------------- greedy parity with HF generate
@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_equals_hf_generate_under_left_padding(tokenizer, arch, monkeypatch):
    model = build(tokenizer, arch)
    attn = model.config._attn_implementation
    ids, mask = left_padded(tokenizer, [3, 11, 6, 1, 9, 11, 4, 8])
    cfg = SamplingConfig(engine="auto", max_new_tokens=12, do_sample=False)
    never = 10**6  # an id outside the vocabulary: every row runs the full budget
    free = hf_generate(model, ids, mask, never, tokenizer.pad_token_id, cfg)  # (8, 12)
    assert free.shape == (8, 12) and not (free == never).any()
    # Now call "EOS" a token that some rows (not all) produce early: rows end at different steps and leave the batch.
    eos = next(t for t in free[:, :6].flatten().tolist() if 2 <= int((free[:, :6] == t).any(-1).sum()) < 8)
    compactions = []
    monkeypatch.setattr(Cache, "reorder_cache", _spy(Cache.reorder_cache, compactions))
    expected = hf_generate(model, ids, mask, eos, tokenizer.pad_token_id, cfg)
    assert not compactions  # generate does not reorder without beams: the calls counted below are ours
    for cache in ("static", "dynamic"):
        for attention in ("auto", "model"):
            ours = decode_loop(model, ids, mask, eos, tokenizer.pad_token_id, cfg, cache=cache, attention=attention)
            assert ours.tolist() == expected.tolist(), (cache, attention)
    assert compactions, "no row ever left the batch"
    assert model.config._attn_implementation == attn


def _spy(fn, calls):
    def wrapped(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return wrapped


def test_sample_responses_same_generation_from_both_engines(tiny_lm, tokenizer):
    ids, mask = left_padded(tokenizer, [4, 9, 2, 7])
    cfg = SamplingConfig(engine="auto", max_new_tokens=10, do_sample=False)
    ours = sample_responses(tiny_lm, ids, mask, tokenizer.eos_token_id, tokenizer.pad_token_id, cfg)
    theirs = sample_responses(
        tiny_lm,
        ids,
        mask,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        SamplingConfig(max_new_tokens=10, do_sample=False, engine="hf"),
    )
    for field in ("response_ids", "response_mask", "ended"):
        assert torch.equal(getattr(ours, field), getattr(theirs, field))


# ----------------------------------------------------------------------------- cached logits = full forward
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_step_logits_equal_full_forward_without_cache(tokenizer, arch, cache, monkeypatch):
    model = build(tokenizer, arch)
    ids, mask = left_padded(tokenizer, [5, 12, 1, 8], seed=1)
    seen = []

    def record(logits, *args):  # warp_logits sees each step's raw logits when T=1 and nothing is filtered
        seen.append(logits.clone())
        return logits

    monkeypatch.setattr("rlhf_lightning.generation.decode.warp_logits", record)  # where decode_loop looks it up
    torch.manual_seed(0)
    cfg = SamplingConfig(engine="auto", max_new_tokens=8)
    response = decode_loop(model, ids, mask, None, tokenizer.pad_token_id, cfg, cache=cache)  # (B, 8)
    full_ids = torch.cat([ids, response], 1)  # (B, Q + 8)
    full_mask = torch.cat([mask, torch.ones_like(response)], 1)
    with torch.no_grad():
        logits = causal_lm_logits(model, full_ids, full_mask)  # (B, Q + 8, V) positions from the mask, no cache
    Q = ids.shape[1]
    assert len(seen) == 8
    for t, step_logits in enumerate(seen):
        torch.testing.assert_close(step_logits, logits[:, Q - 1 + t], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- the sampling maths
@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.9, 40, 0.6), (1.0, 1, 1.0), (1.0, 0, 0.0)],
)
def test_warp_logits_equals_transformers_warpers(temperature, top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(16, 300) * 3
    logits[:4] = torch.randint(-3, 3, (4, 300)).float()  # ties at the top-k and top-p boundaries
    warpers = LogitsProcessorList()  # generate's order: temperature, top-k, top-p (min_tokens_to_keep=1)
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    expected = warpers(torch.zeros(16, 1, dtype=torch.long), logits.clone())
    assert torch.equal(warp_logits(logits, temperature, top_k, top_p), expected)


def test_draw_tokens_never_draws_a_zero_probability_token(monkeypatch):
    logits = torch.tensor([[-math.inf, 0.0, -math.inf, 1.0, -math.inf]] * 3)
    # The extreme uniforms: u = 1 - rand, so rand = 0 gives u = 1 (the last token with mass)
    # and rand just below 1 gives u ~ 0 (the first token with mass, not the -inf at index 0).
    uniforms = torch.tensor([[0.0], [1 - 2**-53], [0.5]], dtype=torch.float64)
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: uniforms)
    assert draw_tokens(logits).tolist() == [3, 1, 3]
    monkeypatch.undo()
    torch.manual_seed(0)
    drawn = draw_tokens(logits[:1].expand(20_000, 5))
    assert set(drawn.unique().tolist()) == {1, 3}


def chi_square_bound(df: int, z: float = 3.090) -> float:
    """The 0.999 quantile of chi-square(df) by Wilson-Hilferty.

    ``df * (1 - 2/(9 df) + z sqrt(2/(9 df)))^3`` with ``z = Phi^-1(0.999) = 3.090``.
    """
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


def test_chi_square_bound_matches_tables():
    # Tables: chi2_0.999(10) = 29.59, chi2_0.999(100) = 149.45; the approximation is within 1 %.
    assert abs(chi_square_bound(10) / 29.59 - 1) < 0.01 and abs(chi_square_bound(100) / 149.45 - 1) < 0.01


def expected_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """softmax(logits / T) cut to the top-k, then to the smallest most-likely set of mass >= top_p; renormalised."""
    probs = (logits.double() / temperature).softmax(-1)  # (V,)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if top_k:
        keep &= probs >= probs.topk(top_k).values[-1]
    probs = torch.where(keep, probs, 0.0)
    probs = probs / probs.sum()
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        before = sorted_p.cumsum(0) - sorted_p  # mass of the more likely tokens
        keep_sorted = before < top_p  # a token stays while the mass above it has not reached top_p
        keep = torch.zeros_like(keep).scatter(0, order, keep_sorted)
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum()
    return probs


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8)])
def test_first_token_frequencies_match_filtered_softmax(tiny_lm, tokenizer, temperature, top_k, top_p):
    with torch.no_grad():
        tiny_lm.lm_head.weight.mul_(30.0)  # a peaked, uneven next-token distribution (the fixture is rebuilt per test)
    prompt = torch.tensor([tokenizer("The movie was").input_ids])
    cfg = SamplingConfig(engine="auto", max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p)
    assert fast_loop_unsupported(tiny_lm, cfg) is None
    with torch.no_grad():
        logits = causal_lm_logits(tiny_lm, prompt, torch.ones_like(prompt))[0, -1]  # (V,)
    probs = expected_probs(logits, temperature, top_k, top_p)  # (V,)
    torch.manual_seed(1234)
    counts = torch.zeros_like(probs)
    n_batches, batch = 4, 5_000
    for _ in range(n_batches):
        ids = prompt.expand(batch, -1)
        gen = sample_responses(tiny_lm, ids, torch.ones_like(ids), tokenizer.eos_token_id, tokenizer.pad_token_id, cfg)
        counts += torch.bincount(gen.response_ids[:, 0], minlength=len(probs)).double()
    n = n_batches * batch
    assert counts[probs == 0].sum() == 0, "a filtered token was sampled"
    # Pearson's chi-square over bins with expected count >= 5; the rarer tokens are pooled into one bin.
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big & (probs > 0)].sum()[None]])
    exp = torch.cat([expected[big], expected[~big & (probs > 0)].sum()[None]])
    obs, exp = obs[exp > 0], exp[exp > 0]
    df = len(exp) - 1
    assert df >= 4, "the test distribution is too concentrated to say anything"
    stat = float(((obs - exp) ** 2 / exp).sum())
    assert stat < chi_square_bound(df), f"chi2 = {stat:.1f} with {df} degrees of freedom"


# ----------------------------------------------------------------------------- EOS, masking, min_new_tokens
def likely_eos_model(tokenizer, eos_bias: float = 3.5):
    """A tiny Llama whose LM head adds ``eos_bias`` to the EOS logit: sampled rows end at various steps."""
    model = build(tokenizer, "llama")
    bias = torch.zeros(model.lm_head.out_features)
    bias[tokenizer.eos_token_id] = eos_bias
    model.lm_head.bias = nn.Parameter(bias)
    return model


def test_masking_after_eos_and_ended_flags(tokenizer):
    model = likely_eos_model(tokenizer)
    ids, mask = left_padded(tokenizer, [4, 9, 2, 7, 5, 6, 3, 8] * 4)
    torch.manual_seed(3)
    cfg = SamplingConfig(engine="auto", max_new_tokens=12)
    gen = sample_responses(model, ids, mask, tokenizer.eos_token_id, tokenizer.pad_token_id, cfg)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert 0 < int(gen.ended.sum()) < len(ids), "want some rows that end and some that do not"
    again = mask_after_eos(gen.response_ids, eos, pad)  # the one masking rule: applying it again changes nothing
    for field in ("response_ids", "response_mask", "ended"):
        assert torch.equal(getattr(again, field), getattr(gen, field))
    for row_ids, row_mask, ended in zip(
        gen.response_ids.tolist(), gen.response_mask.tolist(), gen.ended.tolist(), strict=True
    ):
        n = sum(row_mask)
        assert row_mask == [1] * n + [0] * (len(row_mask) - n)  # 1 through EOS, then 0
        assert ended == (eos in row_ids) and (not ended or row_ids.index(eos) == n - 1)
        assert all(t == pad for t in row_ids[n:])
    # Width: the loop stops as soon as every row has ended, otherwise at the budget.
    assert gen.response_ids.shape[1] == (int(gen.lengths.max()) if gen.ended.all() else cfg.max_new_tokens)


def test_loop_stops_when_every_row_has_ended(tokenizer):
    model = likely_eos_model(tokenizer, eos_bias=1e4)  # EOS is certain at every step where it is allowed
    ids, mask = left_padded(tokenizer, [4, 9, 2])
    cfg = SamplingConfig(engine="auto", max_new_tokens=9)
    gen = sample_responses(model, ids, mask, tokenizer.eos_token_id, tokenizer.pad_token_id, cfg)
    assert gen.response_ids.tolist() == [[tokenizer.eos_token_id]] * 3 and gen.ended.all()
    cfg = SamplingConfig(engine="auto", max_new_tokens=9, min_new_tokens=4)
    gen = sample_responses(model, ids, mask, tokenizer.eos_token_id, tokenizer.pad_token_id, cfg)
    assert gen.response_ids.shape == (3, 5) and (gen.response_ids[:, 4] == tokenizer.eos_token_id).all()


@pytest.mark.parametrize("min_new", [3, 12])
def test_min_new_tokens_masks_eos(tokenizer, min_new):
    model = likely_eos_model(tokenizer)
    ids, mask = left_padded(tokenizer, [4, 9, 2, 7] * 8)
    torch.manual_seed(0)
    cfg = SamplingConfig(engine="auto", max_new_tokens=12, min_new_tokens=min_new)
    gen = sample_responses(model, ids, mask, tokenizer.eos_token_id, tokenizer.pad_token_id, cfg)
    assert not (gen.response_ids[:, :min_new] == tokenizer.eos_token_id).any()
    assert (gen.lengths >= min(min_new + 1, 12)).all()
    if min_new == 12:
        assert not gen.ended.any() and gen.response_ids.shape[1] == 12
    else:
        assert gen.ended.any()


def test_output_is_an_ordinary_tensor_and_model_state_is_restored(tiny_lm, tokenizer):
    tiny_lm.train()
    before = tiny_lm.config._attn_implementation
    ids, mask = left_padded(tokenizer, [3, 6])
    cfg = SamplingConfig(engine="auto", max_new_tokens=4)
    gen = sample_responses(tiny_lm, ids, mask, tokenizer.eos_token_id, tokenizer.pad_token_id, cfg)
    assert tiny_lm.training and tiny_lm.config._attn_implementation == before
    assert not gen.response_ids.is_inference()
    # The ids feed a forward with gradients (an inference tensor could not be saved for backward).
    tiny_lm(input_ids=gen.response_ids).logits.sum().backward()


# ----------------------------------------------------------------------------- which engine
def test_fast_loop_applies_to_plain_decoder_models(tiny_lm, tokenizer):
    assert fast_loop_unsupported(tiny_lm, SamplingConfig(engine="auto")) is None
    assert (
        fast_loop_unsupported(
            build(tokenizer, "gpt2"), SamplingConfig(engine="auto", top_k=5, top_p=0.9, do_sample=False)
        )
        is None
    )
    tiny_lm.generation_config.repetition_penalty = 1.0  # neutral values change nothing
    tiny_lm.generation_config.num_beams = 1
    assert fast_loop_unsupported(tiny_lm, SamplingConfig(engine="auto")) is None


def test_fallback_reasons(tiny_lm, tokenizer, monkeypatch):
    assert "engine='hf'" in fast_loop_unsupported(tiny_lm, SamplingConfig(engine="hf"))
    with pytest.raises(ValueError, match="unknown sampling engine"):
        fast_loop_unsupported(tiny_lm, SamplingConfig(engine="vllm"))
    assert "not a transformers generative model" in fast_loop_unsupported(
        nn.Linear(2, 2), SamplingConfig(engine="auto")
    )
    t5 = AutoModelForSeq2SeqLM.from_config(
        AutoConfig.for_model(
            "t5", vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0
        )
    )
    assert "encoder-decoder" in fast_loop_unsupported(t5, SamplingConfig(engine="auto"))

    class NoPositions(nn.Module):  # a generative model whose forward cannot take position ids
        config = tiny_lm.config
        generation_config = tiny_lm.generation_config
        _supports_default_dynamic_cache = staticmethod(lambda: True)

        def generate(self, **kw): ...

        def forward(self, input_ids, attention_mask=None, past_key_values=None): ...

    assert "position_ids" in fast_loop_unsupported(NoPositions(), SamplingConfig(engine="auto"))

    tiny_lm.generation_config.repetition_penalty = 1.3
    tiny_lm.generation_config.no_repeat_ngram_size = 2
    assert "['no_repeat_ngram_size', 'repetition_penalty']" in fast_loop_unsupported(
        tiny_lm, SamplingConfig(engine="auto")
    )
    tiny_lm.generation_config.repetition_penalty, tiny_lm.generation_config.no_repeat_ngram_size = None, None

    # Sharded parameters (ZeRO-3 marks them with ds_id) on several ranks: generate synchronises the ranks.
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a: 2)
    assert (
        fast_loop_unsupported(tiny_lm, SamplingConfig(engine="auto")) is None
    )  # replicated parameters (DDP): the loop is fine
    monkeypatch.setattr(next(tiny_lm.parameters()), "ds_id", 0, raising=False)
    assert "sharded" in fast_loop_unsupported(tiny_lm, SamplingConfig(engine="auto"))


def test_sample_responses_dispatches_on_the_condition(tiny_lm, tokenizer, monkeypatch):
    calls = []
    empty = torch.zeros(2, 1, dtype=torch.long)
    monkeypatch.setattr(generation, "hf_generate", lambda *a: calls.append("hf") or empty)
    monkeypatch.setattr(generation, "decode_loop", lambda *a: calls.append("loop") or empty)
    ids, mask = left_padded(tokenizer, [3, 5])
    args = (tiny_lm, ids, mask, tokenizer.eos_token_id, tokenizer.pad_token_id)
    sample_responses(*args, SamplingConfig(engine="auto"))
    sample_responses(*args, SamplingConfig(engine="hf"))
    tiny_lm.generation_config.repetition_penalty = 1.2
    sample_responses(*args, SamplingConfig(engine="auto"))
    assert calls == ["loop", "hf", "hf"]


def test_sampling_config_from_before_the_engine_field_loads(tmp_path):
    old = SamplingConfig(engine="hf", top_k=3)
    del old.__dict__["engine"]  # what unpickling a checkpoint written before the field existed gives
    assert old.engine == "auto"  # the class default; a model the loop cannot run still goes to generate
    assert "not a transformers generative model" in fast_loop_unsupported(nn.Linear(1, 1), old)
    torch.save({"sampling": SamplingConfig(engine="hf")}, tmp_path / "s.pt")
    assert torch.load(tmp_path / "s.pt", weights_only=True)["sampling"].engine == "hf"
