"""Tests for rlhf_lightning.rollout: select, cat with padding, buffer minibatches."""

import pytest
import torch

from rlhf_lightning.rl.rollout import Rollout, RolloutBuffer

PAD = 7


def make_rollout(ids, q_width, a_width):
    """Rollout whose every field encodes the sample id (ids are 1-based, so 0 means padding)."""
    ids = torch.tensor(ids, dtype=torch.float32)
    B = len(ids)
    row = ids[:, None]
    return Rollout(
        query_ids=row.long().expand(B, q_width).clone(),  # (B, Q)
        query_mask=torch.ones(B, q_width, dtype=torch.long),
        response_ids=(100 + row).long().expand(B, a_width).clone(),  # (B, A)
        response_mask=torch.ones(B, a_width, dtype=torch.long),
        logprobs=-row.expand(B, a_width).clone(),
        ref_logprobs=-2 * row.expand(B, a_width).clone(),
        values=row.expand(B, a_width).clone(),
        scores=ids.clone(),  # (B,)
    )


def test_select_keeps_rows_in_order_and_none_fields():
    r = make_rollout([1, 2, 3, 4], q_width=2, a_width=3)
    s = r.select([3, 0])
    assert s.batch_size == 2 and len(s) == 2
    assert s.scores.tolist() == [4.0, 1.0]
    assert s.query_ids[:, 0].tolist() == [4, 1] and s.values[:, 0].tolist() == [4.0, 1.0]
    assert s.rewards is None and s.advantages is None
    assert torch.equal(r.select(torch.tensor([1])).response_ids, torch.full((1, 3), 102))


def test_to_moves_every_tensor():
    r = make_rollout([1, 2], 2, 3)
    moved = r.to("meta")  # a device without data: proves every set field was moved
    assert all(getattr(moved, k).device.type == "meta" for k in ("query_ids", "logprobs", "values", "scores"))
    assert moved.returns is None and r.logprobs.device.type == "cpu"  # a copy, original untouched


def test_cat_pads_queries_left_and_responses_right():
    a = make_rollout([1], q_width=2, a_width=3)
    b = make_rollout([2, 3], q_width=4, a_width=1)
    c = Rollout.cat([a, b], pad_token_id=PAD)
    assert c.batch_size == 3 and c.scores.tolist() == [1.0, 2.0, 3.0]
    # queries: width 4, row 0 left-padded by 2 with PAD, mask 0 there
    assert c.query_ids.tolist() == [[PAD, PAD, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]]
    assert c.query_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]
    # responses: width 3, rows 1-2 right-padded by 2 with PAD; masks and floats with 0
    assert c.response_ids.tolist() == [[101, 101, 101], [102, PAD, PAD], [103, PAD, PAD]]
    assert c.response_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 0, 0]]
    assert c.values.tolist() == [[1.0, 1.0, 1.0], [2.0, 0.0, 0.0], [3.0, 0.0, 0.0]]
    assert c.ref_logprobs.tolist() == [[-2.0, -2.0, -2.0], [-4.0, 0.0, 0.0], [-6.0, 0.0, 0.0]]
    assert c.advantages is None


def test_cat_rejects_partially_set_fields():
    a, b = make_rollout([1], 2, 2), make_rollout([2], 2, 2)
    b.rewards = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="rewards"):
        Rollout.cat([a, b])


def _buffer(n=10):
    buf = RolloutBuffer(pad_token_id=PAD)
    buf.add(make_rollout(list(range(1, 5)), q_width=3, a_width=2))  # samples 1..4
    buf.add(make_rollout(list(range(5, n + 1)), q_width=2, a_width=5))  # samples 5..n
    return buf


def _order(buf, seed, **kw):
    g = torch.Generator().manual_seed(seed)
    return [mb.scores.long().tolist() for mb in buf.minibatches(4, epochs=3, generator=g, **kw)]


def test_minibatches_cover_each_sample_once_per_epoch():
    buf = _buffer()
    assert len(buf) == 10
    batches = _order(buf, seed=0)
    assert [len(b) for b in batches] == [4, 4, 2] * 3  # the last partial minibatch is yielded
    epochs = [sum(batches[i : i + 3], []) for i in (0, 3, 6)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(1, 11))
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]  # a fresh permutation each epoch
    assert epochs[0] != list(range(1, 11))  # shuffled
    # rows stay consistent across fields after padding and shuffling
    for mb in buf.minibatches(3, generator=torch.Generator().manual_seed(5)):
        assert torch.equal(mb.response_ids[:, 0], 100 + mb.scores.long())
        assert torch.equal(mb.query_ids[:, -1], mb.scores.long())


def test_minibatches_reproducible_and_unshuffled():
    buf = _buffer()
    assert _order(buf, seed=1) == _order(buf, seed=1)
    assert _order(buf, seed=1) != _order(buf, seed=2)
    flat = sum(_order(buf, seed=1, shuffle=False), [])
    assert flat == list(range(1, 11)) * 3


def test_buffer_all_and_clear():
    buf = _buffer()
    merged = buf.all()
    assert merged.batch_size == 10
    assert merged.query_ids.shape == (10, 3) and merged.response_ids.shape == (10, 5)
    assert merged.response_mask.sum().item() == 4 * 2 + 6 * 5
    buf.add(make_rollout([11], 1, 1))
    assert buf.all().batch_size == 11  # cache refreshed after add
    buf.clear()
    assert len(buf) == 0
    with pytest.raises(ValueError):
        buf.all()
