"""Tests for rlhf_lightning.logprobs: hand values, naive references, masking invariances."""

import functools
import math
import threading

import pytest
import torch
import torch.distributed as dist

from rlhf_lightning.logprobs import (
    entropy_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    seq_mean_token_mean,
    seq_mean_token_sum_norm,
    sequence_logprobs,
    token_logprobs,
)


def test_token_logprobs_hand_values():
    # logits [0, log 3]: p = [1/4, 3/4] -> log p = [-1.386294, -0.287682]
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])  # (1, 2, 2)
    labels = torch.tensor([[0, 1]])
    assert torch.allclose(token_logprobs(logits, labels), torch.tensor([[-1.386294, -0.287682]]), atol=1e-5)
    # temperature 2: logits [0, log(3)/2] -> p1 = sqrt3 / (1 + sqrt3) = 0.633975 -> log = -0.455736
    out = token_logprobs(logits, labels, temperature=2.0)
    assert torch.allclose(out[0, 1], torch.tensor(-0.455736), atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_matches_log_softmax_gather(temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 3
    labels = torch.randint(0, 11, (3, 5), generator=g)
    naive = torch.empty(3, 5)
    for b in range(3):
        for t in range(5):
            naive[b, t] = torch.log_softmax(logits[b, t] / temperature, -1)[labels[b, t]]
    assert torch.allclose(token_logprobs(logits, labels, temperature), naive, atol=1e-5)


def test_token_logprobs_bf16_is_float32_and_differentiable():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 4, 7, generator=g) * 5).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 7, (2, 4), generator=g)
    out = token_logprobs(logits, labels)
    assert out.dtype == torch.float32
    expected = torch.log_softmax(logits.detach().float(), -1).gather(-1, labels[..., None]).squeeze(-1)
    assert torch.allclose(out, expected, atol=1e-6)
    out.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad.float()).all()


def test_masked_sum_and_mean_hand_values():
    x = torch.tensor([[1.0, 2.0, float("inf")], [4.0, float("nan"), 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_sum(x, mask).item() == 7.0  # 1 + 2 + 4; inf/nan at masked positions ignored
    assert masked_mean(x, mask).item() == pytest.approx(7 / 3)
    assert torch.equal(masked_mean(x, mask, dim=-1), torch.tensor([1.5, 4.0]))  # (1+2)/2, 4/1
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0  # empty mask -> 0, not nan


def test_masked_var_hand_values():
    x = torch.tensor([1.0, 2.0, 4.0, 100.0])
    mask = torch.tensor([1, 1, 1, 0])
    # mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 14/3; unbiased /2 = 7/3, biased /3 = 14/9
    assert masked_var(x, mask).item() == pytest.approx(7 / 3, rel=1e-6)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(14 / 9, rel=1e-6)


def test_masked_whiten_hand_value():
    # x = [1, 3]: mean 2, unbiased var 2 -> [-1/sqrt2, 1/sqrt2] = [-0.707107, 0.707107]
    out = masked_whiten(torch.tensor([1.0, 3.0, 50.0]), torch.tensor([1, 1, 0]))
    assert torch.allclose(out, torch.tensor([-0.707107, 0.707107, 0.0]), atol=1e-5)


def test_masked_whiten_ignores_masked_positions():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 6, generator=g) * 3 + 5
    mask = torch.rand(4, 6, generator=g) > 0.4
    out = masked_whiten(x, mask)
    x2 = torch.where(mask, x, torch.full_like(x, 1e6))  # change only masked-out values
    assert torch.equal(masked_whiten(x2, mask), out)
    assert (out[~mask] == 0).all()
    assert masked_mean(out, mask).item() == pytest.approx(0.0, abs=1e-5)
    assert masked_var(out, mask).item() == pytest.approx(1.0, abs=1e-4)
    # shift_mean=False keeps the mean, only rescales
    kept = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(kept, mask).item() == pytest.approx(masked_mean(x, mask).item(), rel=1e-5)
    assert masked_var(kept, mask).item() == pytest.approx(1.0, abs=1e-4)
    # all_reduce without a process group is the local computation
    assert torch.equal(masked_whiten(x, mask, all_reduce=True), out)


def test_masked_whiten_all_reduce_uses_global_statistics(monkeypatch):
    """Two threads play two ranks; a real SUM all-reduce between them via a barrier."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, generator=g) * 2 + 1
    mask = torch.rand(6, 5, generator=g) > 0.3
    shards = [(x[:2], mask[:2]), (x[2:], mask[2:])]  # unequal shards: global != local stats
    barrier, slots, rank_of = threading.Barrier(2), {}, {}

    def fake_all_reduce(tensor, op=None):
        rank = rank_of[threading.get_ident()]
        slots[rank] = tensor.clone()
        barrier.wait()
        total = slots[0] + slots[1]
        barrier.wait()
        tensor.copy_(total)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    results = [None, None]

    def run(rank):
        rank_of[threading.get_ident()] = rank
        results[rank] = masked_whiten(*shards[rank], all_reduce=True)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    monkeypatch.undo()
    expected = masked_whiten(x, mask)
    assert torch.allclose(torch.cat(results), expected, atol=1e-5)
    assert not torch.allclose(masked_whiten(*shards[0]), expected[:2], atol=1e-3)  # local stats differ


def test_entropy_from_logits():
    # uniform over 4 -> log 4 = 1.386294; [0, 0, -inf] -> uniform over 2 -> log 2 = 0.693147
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, float("-inf"), float("-inf")]]])
    assert torch.allclose(entropy_from_logits(logits), torch.tensor([[1.386294, 0.693147]]), atol=1e-5)
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 3, 9, generator=g) * 4
    p = torch.softmax(z, -1)
    assert torch.allclose(entropy_from_logits(z), -(p * p.log()).sum(-1), atol=1e-5)
    assert entropy_from_logits(z.to(torch.bfloat16)).dtype == torch.float32


def test_sequence_logprobs():
    logps = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.equal(sequence_logprobs(logps, mask), torch.tensor([-3.0, -0.5]))  # -1-2, -0.5
    assert torch.equal(sequence_logprobs(logps, mask, average=True), torch.tensor([-1.5, -0.5]))  # -3/2, -0.5/1


def test_loss_aggregates_hand_values():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # token mean (DAPO): (1 + 2 + 4) / 3 = 7/3
    assert masked_mean(x, mask).item() == pytest.approx(7 / 3)
    # GRPO: row means (1 + 2)/2 = 1.5 and 4/1 = 4 -> (1.5 + 4) / 2 = 2.75
    loss = seq_mean_token_mean(x, mask)
    assert loss.item() == pytest.approx(2.75)
    # each token weighs 1 / (G |o_i|): row 0 tokens 1/(2*2) = 0.25, row 1 token 1/(2*1) = 0.5
    loss.backward()
    assert torch.allclose(x.grad, torch.tensor([[0.25, 0.25, 0.0], [0.5, 0.0, 0.0]]))
    # Dr. GRPO, norm 4: row sums 3/4 = 0.75 and 4/4 = 1 -> (0.75 + 1) / 2 = 0.875
    assert seq_mean_token_sum_norm(x, mask, norm=4).item() == pytest.approx(0.875)
    bound = functools.partial(seq_mean_token_sum_norm, norm=4)  # the (x, mask) -> scalar form
    assert bound(x, mask).item() == pytest.approx(0.875)


def test_loss_aggregates_ignore_padding_rows_and_empty_mask():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, float("nan"), 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # row 2 is all padding: not a sequence
    assert seq_mean_token_mean(x, mask).item() == pytest.approx(2.75)
    assert seq_mean_token_sum_norm(x, mask, 4).item() == pytest.approx(0.875)
    empty = torch.zeros_like(mask)
    assert seq_mean_token_mean(x, empty).item() == 0.0 and seq_mean_token_sum_norm(x, empty, 4).item() == 0.0


def test_loss_aggregates_match_naive_loops():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 7, generator=g)
    mask = torch.rand(5, 7, generator=g) > 0.5
    mask[3] = False
    rows = [[x[b, t].item() for t in range(7) if mask[b, t]] for b in range(5)]
    rows = [r for r in rows if r]
    grpo = sum(sum(r) / len(r) for r in rows) / len(rows)
    dr_grpo = sum(sum(r) / 16 for r in rows) / len(rows)
    assert seq_mean_token_mean(x, mask).item() == pytest.approx(grpo, rel=1e-5)
    assert seq_mean_token_sum_norm(x, mask, 16).item() == pytest.approx(dr_grpo, rel=1e-5)
