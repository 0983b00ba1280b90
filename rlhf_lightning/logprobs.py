"""Per-token log-probabilities, entropies and masked reductions.

Every module (SFT, reward, DPO, PPO) computes log-probs and masked statistics with these
functions, so the maths lives in exactly one place. Conventions: ``B`` batch, ``T``
tokens, ``V`` vocabulary; ``mask`` is 1 (or True) on positions that count, 0 elsewhere.
Masked reductions select with ``torch.where`` rather than multiplying, so ``inf``/``nan``
at masked-out positions never leak into a result.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "token_logprobs",
    "entropy_from_logits",
    "chunked_token_logprobs",
    "sequence_logprobs",
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "seq_mean_token_mean",
    "seq_mean_token_sum_norm",
]


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities of ``labels`` under ``softmax(logits / temperature)``.

    ``log p(y_t) = z_t[y_t] - logsumexp(z_t)`` with ``z_t = logits_t / temperature``.
    Logits and labels must already be aligned (the caller shifts: ``logits[:, :-1]``
    predict ``input_ids[:, 1:]``). Dividing by the sampling temperature makes PPO ratios
    and KL refer to the policy that actually generated the tokens.

    Memory: works one batch row at a time in float32 (also for bf16/fp16 input), so at
    most one ``(T, V)`` float32 copy exists at a time and no full ``log_softmax`` is kept.

    Args:
        logits: ``(B, T, V)`` unnormalised scores, any float dtype.
        labels: ``(B, T)`` integer token ids in ``[0, V)`` (replace ignore indices first).
        temperature: positive sampling temperature.

    Returns:
        ``(B, T)`` float32 log-probabilities.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} are not aligned")
    rows = []
    for row_logits, row_labels in zip(logits, labels, strict=True):  # one (T, V) float32 copy at a time
        z = row_logits.float()
        if temperature != 1.0:
            z = z / temperature
        picked = z.gather(-1, row_labels.long().unsqueeze(-1)).squeeze(-1)  # (T,)
        rows.append(picked - torch.logsumexp(z, dim=-1))
    if not rows:
        return logits.new_zeros(labels.shape, dtype=torch.float32)
    return torch.stack(rows)  # (B, T)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` at every position, in float32.

    ``H = logsumexp(z) - sum_v softmax(z)_v z_v`` (stable: no ``log`` of a probability;
    ``-inf`` logits, e.g. from top-k filtering, contribute 0).
    Computed one leading row at a time to bound the float32 working memory.

    Args:
        logits: ``(..., V)`` unnormalised scores.

    Returns:
        ``(...)`` float32 entropies (nats).
    """
    flat = logits.reshape(-1, logits.shape[-1])  # (N, V)
    n_chunks = logits.shape[0] if logits.dim() > 2 else 1  # one batch row at a time
    out = []
    for part in flat.chunk(max(1, n_chunks)):
        z = part.float()
        finite_z = torch.where(torch.isneginf(z), torch.zeros_like(z), z)  # -inf logits have p = 0
        out.append(torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * finite_z).sum(-1))
    return torch.cat(out).reshape(logits.shape[:-1])


def _head_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, softcap: float | None, temperature: float):
    """``(C, V)`` float32 logits ``softcap(h W^T + b) / temperature`` of one chunk (matmul in ``h``'s dtype)."""
    z = h @ w.t() if b is None else torch.addmm(b, h, w.t())
    z = z.to(torch.promote_types(z.dtype, torch.float32))  # (C, V) float32 (float64 stays)
    if softcap is not None:
        z = torch.tanh(z.div_(softcap)).mul_(softcap)  # cap * tanh(z / cap), Gemma 2's final soft-capping
    return z.div_(temperature) if temperature != 1.0 else z


class _ChunkedLogprobs(torch.autograd.Function):
    """Log-probs (and entropy) from hidden states, one chunk of rows at a time.

    Forward keeps only each row's ``logsumexp``; backward recomputes each chunk's logits
    and applies ``d log p(y) / d z = onehot(y) - softmax(z)`` by hand, so at most one
    chunk's ``(C, V)`` float32 logits exist at a time in either pass.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, softcap, chunk_size, with_entropy):
        device = hidden.device.type
        autocast = torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else torch.promote_types(hidden.dtype, weight.dtype)
        n, acc = hidden.shape[0], torch.promote_types(dtype, torch.float32)
        logps = hidden.new_empty(n, dtype=acc)  # (N,)
        lse = hidden.new_empty(n, dtype=acc)  # (N,)
        entropy = hidden.new_empty(n, dtype=acc) if with_entropy else None  # (N,)
        with torch.autocast(device, enabled=False):
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)  # (V, H), (V,)
            for s in range(0, n, chunk_size):
                z = _head_logits(hidden[s : s + chunk_size].to(dtype), w, b, softcap, temperature)  # (C, V)
                lse[s : s + chunk_size] = torch.logsumexp(z, dim=-1)
                picked = z.gather(-1, labels[s : s + chunk_size, None]).squeeze(-1)  # (C,)
                logps[s : s + chunk_size] = picked - lse[s : s + chunk_size]
                if with_entropy:  # H = lse - sum_v p_v z_v
                    p = torch.softmax(z, dim=-1)  # (C, V)
                    entropy[s : s + chunk_size] = lse[s : s + chunk_size] - (p * z).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.settings = (temperature, softcap, chunk_size, dtype, device)
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        temperature, softcap, chunk_size, dtype, device = ctx.settings
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None  # (N, H)
        acc = lse.dtype
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None  # (V, H) accumulated in fp32
        grad_b = torch.zeros_like(bias, dtype=acc) if need_b else None  # (V,)
        with torch.autocast(device, enabled=False):
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            for s in range(0, hidden.shape[0], chunk_size):
                h = hidden[s : s + chunk_size].to(dtype)  # (C, H)
                z = _head_logits(h, w, b, softcap, temperature)  # (C, V)
                # d tanh-cap(u) / du = 1 - (cap(u) / cap)^2, with cap(u) = temperature * z
                dcap = 1 - (z * (temperature / softcap)).square_() if softcap is not None else None
                scale = grad_logps[s : s + chunk_size].to(acc) / temperature  # (C,)
                dz = z.sub_(lse[s : s + chunk_size, None]).exp_().mul_(-scale[:, None])  # -g p / T, (C, V)
                dz.scatter_add_(-1, labels[s : s + chunk_size, None], scale[:, None])  # + g onehot(y) / T
                if dcap is not None:
                    dz.mul_(dcap)
                if grad_b is not None:
                    grad_b += dz.sum(0)
                dz = dz.to(dtype)
                if grad_h is not None:
                    grad_h[s : s + chunk_size] = dz @ w
                if grad_w is not None:
                    if dtype == acc:
                        grad_w.addmm_(dz.t(), h)
                    else:
                        grad_w += dz.t() @ h
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def chunked_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    chunk_size: int = 512,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`token_logprobs` (and :func:`entropy_from_logits`) of a linear LM head, without the full logits.

    ``z = softcap(hidden W^T + bias) / temperature`` with ``softcap(u) = c tanh(u / c)``
    when ``softcap = c`` is given; ``log p(y) = z[y] - logsumexp(z)``. Rows are processed
    ``chunk_size`` at a time: the matmul runs in the input dtype (the autocast dtype under
    autocast), each chunk's logits are upcast to float32, and backward recomputes them
    (gradients for ``hidden``, ``weight`` and ``bias``), so peak memory holds about one
    ``(chunk_size, V)`` float32 block instead of ``(N, V)``. Values and gradients equal
    those of the plain computation up to float rounding.

    Args:
        hidden: ``(N, H)`` last hidden states (the rows predicting ``labels``).
        weight: ``(V, H)`` LM-head weight (the input embeddings when tied).
        labels: ``(N,)`` integer token ids in ``[0, V)``.
        bias: optional ``(V,)`` LM-head bias.
        temperature: positive sampling temperature.
        softcap: final-logit soft-capping constant, or None.
        chunk_size: rows per chunk.
        with_entropy: also return the entropy of each row's distribution (no gradient).

    Returns:
        ``(logprobs (N,), entropy (N,) or None)``, float32.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1] or weight.shape[-1] != hidden.shape[-1]:
        raise ValueError(f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, labels {tuple(labels.shape)}")
    return _ChunkedLogprobs.apply(
        hidden, weight, bias, labels.long(), float(temperature), softcap, int(chunk_size), with_entropy
    )


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over positions where ``mask`` is set.

    Args:
        x: tensor of any shape.
        mask: same shape as ``x`` (bool or 0/1).
        dim: reduce over this dimension; ``None`` reduces over everything.

    Returns:
        Scalar tensor, or ``x`` reduced over ``dim``.
    """
    picked = torch.where(mask.bool(), x, torch.zeros_like(x))
    return picked.sum() if dim is None else picked.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is set ("token mean" when ``dim=None``).

    ``sum(x * mask) / sum(mask)``; an empty mask gives 0 rather than ``nan`` (no
    host sync is needed to check).

    Args:
        x: tensor of any shape.
        mask: same shape as ``x``.
        dim: reduce over this dimension; ``None`` reduces over everything.

    Returns:
        Scalar tensor, or ``x`` reduced over ``dim``.
    """
    count = masked_sum(torch.ones_like(x), mask, dim)
    return masked_sum(x, mask, dim) / count.clamp_min(1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all masked positions (scalar).

    Two-pass: ``sum((x - mean)^2 * mask) / (n - 1)`` (or ``/ n`` when ``unbiased=False``),
    ``n = sum(mask)``. The denominator is clamped to at least 1, so ``n <= 1`` gives 0.

    Args:
        x: tensor of any shape.
        mask: same shape as ``x``.
        unbiased: apply Bessel's correction.

    Returns:
        Scalar tensor.
    """
    mean = masked_mean(x, mask)
    n = mask.bool().sum().to(x.dtype)
    sq = masked_sum((x - mean) ** 2, mask)
    return sq / ((n - 1) if unbiased else n).clamp_min(1)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, all_reduce: bool = False, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise ``x`` to mean 0 and (unbiased) variance 1 over the masked positions.

    ``(x - mean) / sqrt(var + eps)`` (``+ mean`` again when ``shift_mean=False``, which
    only rescales), set to 0 outside the mask. Statistics are computed in float32.

    Distributed: with ``all_reduce=True`` and an initialised ``torch.distributed``
    process group, the per-rank sum and count are all-reduced (SUM) to get the global
    mean, then the per-rank sum of squared deviations from that global mean is
    all-reduced (SUM); every rank thus whitens with the statistics of the whole
    rollout batch (two tiny collectives; every rank must call this). The two-pass form
    equals ``sumsq / n - mean^2`` but avoids its cancellation error. Without a process
    group ``all_reduce`` is ignored.

    Args:
        x: tensor of any shape, e.g. ``(B, A)`` advantages.
        mask: same shape as ``x``.
        shift_mean: if False, keep the original mean (only divide by the std).
        all_reduce: use global statistics across ranks.
        eps: added to the variance.

    Returns:
        Tensor like ``x`` (float32 stats cast back to ``x.dtype``), 0 outside the mask.
    """
    xf = x.float()
    m = mask.bool()
    stats = torch.stack([masked_sum(xf, m), m.sum().float()])  # (2,) sum, count
    distributed = all_reduce and dist.is_available() and dist.is_initialized()
    if distributed:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
    total, n = stats[0], stats[1]
    mean = total / n.clamp_min(1)
    sq = masked_sum((xf - mean) ** 2, m)
    if distributed:
        sq = sq.clone()
        dist.all_reduce(sq, op=dist.ReduceOp.SUM)
    var = sq / (n - 1).clamp_min(1)
    whitened = (xf - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, torch.zeros_like(whitened)).to(x.dtype)


def seq_mean_token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over sequences of each sequence's token mean (GRPO, Shao et al. 2024, eq. 3).

    ``L = (1/G) sum_i (1/|o_i|) sum_t x_{i,t}``: every sequence weighs the same whatever
    its length, so a token of a short answer weighs more than one of a long answer
    (the length bias Dr. GRPO removes). ``G`` counts only rows with at least one masked
    token (an all-padding row is not a sequence); an empty mask gives 0.
    Same ``(x, mask) -> scalar`` signature as :func:`masked_mean` (the DAPO token mean),
    so either can be passed as a loss's ``aggregate``.

    Args:
        x: ``(B, A)`` per-token values (e.g. per-token losses).
        mask: ``(B, A)`` 1 on response tokens.

    Returns:
        Scalar tensor.
    """
    m = mask.bool()
    per_seq = masked_mean(x, m, dim=-1)  # (B,)
    has_tokens = m.any(dim=-1)  # (B,)
    return masked_mean(per_seq, has_tokens)


def seq_mean_token_sum_norm(x: torch.Tensor, mask: torch.Tensor, norm: float) -> torch.Tensor:
    """Mean over sequences of each sequence's token sum divided by a constant (Dr. GRPO,
    Liu et al. 2025, "Understanding R1-Zero-Like Training": GRPO's ``1/|o_i|`` removed).

    ``L = (1/G) sum_i (1/norm) sum_t x_{i,t}`` with ``norm`` a constant (typically the
    generation budget, max new tokens): no per-sequence length normalisation, hence no
    length bias. ``G`` counts only rows with at least one masked token; an empty mask
    gives 0. Bind ``norm`` to get an ``(x, mask) -> scalar`` aggregate:
    ``functools.partial(seq_mean_token_sum_norm, norm=max_new_tokens)``.

    Args:
        x: ``(B, A)`` per-token values.
        mask: ``(B, A)`` 1 on response tokens.
        norm: positive constant dividing every sequence's sum.

    Returns:
        Scalar tensor.
    """
    m = mask.bool()
    per_seq = masked_sum(x, m, dim=-1) / norm  # (B,)
    has_tokens = m.any(dim=-1)  # (B,)
    return masked_mean(per_seq, has_tokens)


def sequence_logprobs(token_logps: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Per-sequence log-probability: sum (or mean) of masked token log-probs.

    ``log pi(y|x) = sum_t mask_t log pi(y_t | x, y_<t)``; ``average=True`` divides by the
    number of masked tokens (length-normalised, as SimPO uses).

    Args:
        token_logps: ``(B, T)`` token log-probs (from :func:`token_logprobs`).
        mask: ``(B, T)`` 1 on response tokens.
        average: return the per-token mean instead of the sum.

    Returns:
        ``(B,)`` tensor.
    """
    if average:
        return masked_mean(token_logps, mask, dim=-1)
    return masked_sum(token_logps, mask, dim=-1)
