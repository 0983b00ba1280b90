"""Chunked log-probs from hidden states against the naive full-logits computation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rlhf_lightning.logprobs import chunked_token_logprobs, entropy_from_logits, token_logprobs
from rlhf_lightning.models import disable_dropout, response_logprobs
from rlhf_lightning.models.forward import linear_head


def naive(hidden, weight, labels, bias=None, temperature=1.0, softcap=None):
    """Full (N, V) logits, then the package's reference functions."""
    logits = hidden @ weight.t() + (0 if bias is None else bias)  # (N, V)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    z = logits / temperature
    return token_logprobs(z[None], labels[None])[0], entropy_from_logits(z.detach())  # (N,), (N,)


def leaves(n=37, h=16, v=50, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5 * 3).requires_grad_()
    b = torch.randn(v, generator=g).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    upstream = torch.randn(n, generator=g)  # a per-row gradient, as DPO's weighted sums give
    return hidden, weight, b, labels, upstream


def grads(out, upstream, *inputs):
    return torch.autograd.grad((out * upstream).sum(), [x for x in inputs if x is not None])


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 37, 1000])  # 37 rows: most sizes do not divide N
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("bias", [False, True])
def test_values_and_gradients_equal_naive(chunk_size, temperature, softcap, bias):
    hidden, weight, b, labels, upstream = leaves(bias=bias)
    ref_lp, ref_ent = naive(hidden, weight, labels, b, temperature, softcap)
    lp, ent = chunked_token_logprobs(hidden, weight, labels, b, temperature, softcap, chunk_size, with_entropy=True)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ent.shape == (37,)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)  # a sum over V: rounding order differs
    assert not ent.requires_grad
    inputs = (hidden, weight, b)
    for got, want in zip(grads(lp, upstream, *inputs), grads(ref_lp, upstream, *inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64():
    # Finite differences on the custom backward (softcap and temperature included).
    hidden, weight, b, labels, _ = leaves(n=7, h=4, v=9)
    args = [t.detach().double().requires_grad_() for t in (hidden, weight, b)]

    def f(h, w, bb):
        return chunked_token_logprobs(h, w, labels, bb, temperature=0.8, softcap=3.0, chunk_size=3)[0]

    assert torch.autograd.gradcheck(f, args)


def test_masked_rows_do_not_leak_and_frozen_head():
    # Rows the caller masks get finite values; a masked loss gives them zero gradient,
    # and a head without grad (LoRA, frozen) gets none.
    hidden, weight, _, labels, _ = leaves()
    weight = weight.detach()
    mask = torch.arange(37) % 3 != 0
    lp, _ = chunked_token_logprobs(hidden, weight, labels, chunk_size=8)
    assert torch.isfinite(lp).all()
    (g,) = torch.autograd.grad(torch.where(mask, lp, torch.zeros_like(lp)).sum(), hidden)
    assert (g[~mask] == 0).all() and (g[mask] != 0).any()
    ref, _ = naive(hidden, weight, labels)
    (g_ref,) = torch.autograd.grad(torch.where(mask, ref, torch.zeros_like(ref)).sum(), hidden)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)


def test_tied_embeddings_accumulate_both_gradients():
    # The head weight is also the embedding table: its gradient sums both uses.
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 16)
    ids = torch.randint(0, 50, (2, 9))
    labels = torch.randint(0, 50, (18,))

    def run(fn):
        emb.zero_grad()
        hidden = torch.tanh(emb(ids)).reshape(-1, 16)  # (18, 16)
        fn(hidden).sum().backward()
        return emb.weight.grad.clone()

    got = run(lambda h: chunked_token_logprobs(h, emb.weight, labels, chunk_size=4)[0])
    want = run(lambda h: naive(h, emb.weight, labels)[0])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_is_float32_and_close():
    hidden, weight, _, labels, upstream = leaves()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, _ = chunked_token_logprobs(hidden, weight, labels, chunk_size=8)
        ref = token_logprobs((hidden @ weight.t())[None], labels[None])[0]
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-5)  # the same bf16 matmul, fp32 after it
    g, g_ref = grads(lp, upstream, hidden), grads(ref, upstream, hidden)
    torch.testing.assert_close(g[0], g_ref[0], rtol=2e-2, atol=2e-2)


TINY = {
    "llama": dict(
        model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    ),
    "llama_tied": dict(
        model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    ),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "gemma2": dict(
        model_type="gemma2", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.5,  # small: the cap really bends these logits
    ),
}  # fmt: skip


def tiny_model(kind, vocab=97):
    config = dict(TINY[kind])
    model_type = config.pop("model_type")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, vocab_size=vocab, **config))
    return disable_dropout(model.float().train())  # as DPO and PPO train


def batch(vocab=97):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded query
    mask[1, -4:] = 0  # a right-padded response
    return ids, mask


@pytest.mark.parametrize("kind", list(TINY))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logprobs_chunked_equals_plain(kind, temperature):
    model = tiny_model(kind)
    assert linear_head(model, batch()[0]) is not None  # the split reproduces the model's logits
    ids, mask = batch()
    outs = {}
    for name, chunk in (("plain", None), ("chunked", 5)):
        model.zero_grad()
        out = response_logprobs(model, ids, mask, 4, temperature, with_entropy=True, with_hidden=True, chunk_size=chunk)
        real = mask[:, 4:].bool()  # (B, A)
        torch.where(real, out.logprobs, 0.0).sum().backward()
        grad = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        outs[name] = (out, grad)
    (plain, g_plain), (chunked, g_chunked) = outs["plain"], outs["chunked"]
    torch.testing.assert_close(chunked.logprobs, plain.logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.entropy, plain.entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.hidden, plain.hidden)  # what a value head reads is unchanged
    assert g_plain.keys() == g_chunked.keys()
    for name in g_plain:
        torch.testing.assert_close(g_chunked[name], g_plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_unreproducible_logits_fall_back_to_plain():
    # A head that rescales its logits (Cohere's logit_scale, Granite's logits_scaling) is
    # detected on first use and scored through the full logits.
    model = tiny_model("llama")

    class Scaled(type(model)):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    model.__class__ = Scaled
    ids, mask = batch()
    assert linear_head(model, ids) is None
    out = response_logprobs(model, ids, mask, 4, chunk_size=5)
    plain = response_logprobs(model, ids, mask, 4, chunk_size=None)
    torch.testing.assert_close(out.logprobs, plain.logprobs)


def test_auto_chunk_rows_bound_the_logits():
    from rlhf_lightning.models.forward import LOGITS_PER_CHUNK, chunk_rows

    assert chunk_rows("auto", 128256) == LOGITS_PER_CHUNK // 128256 == 261  # 2^25 / 128256
    assert chunk_rows("auto", 4096) == 8192 and chunk_rows(300, 4096) == 300
    with pytest.raises(ValueError):
        chunk_rows(0, 4096)
