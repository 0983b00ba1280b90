"""Tests for rlhf_lightning.advantages: hand values, naive loops, KL controllers."""

import math
import statistics

import pytest
import torch

from rlhf_lightning import advantages as advantages_module
from rlhf_lightning.advantages import (
    ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    dr_grpo_advantages,
    explained_variance,
    gae,
    group_advantages,
    groups_with_signal,
    kl_penalized_rewards,
    kl_per_token,
    reinforce_pp_advantages,
    rloo_advantages,
)
from rlhf_lightning.logprobs import masked_mean


def test_kl_per_token_hand_values():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    # k1 = log 0.5 - log 0.25 = log 2 = 0.693147
    assert kl_per_token(logp, ref, "k1").item() == pytest.approx(0.693147, rel=1e-5)
    # k2 = 0.5 * (log 2)^2 = 0.5 * 0.480453 = 0.240227
    assert kl_per_token(logp, ref, "k2").item() == pytest.approx(0.240227, rel=1e-5)
    # k3: r = ref/pi = 0.5 -> (0.5 - 1) - log 0.5 = -0.5 + 0.693147 = 0.193147
    assert kl_per_token(logp, ref, "k3").item() == pytest.approx(0.193147, rel=1e-5)


def test_k3_non_negative_where_k1_is_not():
    g = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(64, generator=g) * 2, torch.randn(64, generator=g) * 2
    assert (kl_per_token(logp, ref, "k1") < 0).any()
    assert (kl_per_token(logp, ref, "k3") >= 0).all()
    assert (kl_per_token(logp, ref, "k2") >= 0).all()


def test_kl_unknown_estimator_lists_valid_names():
    with pytest.raises(ValueError, match="k1.*k2.*k3"):
        kl_per_token(torch.zeros(1), torch.zeros(1), "k4")


def test_kl_penalized_rewards_ragged_rows():
    scores = torch.tensor([1.0, 2.0, 3.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    logp = torch.full((3, 4), 0.5)
    ref = torch.zeros(3, 4)
    # k1 = 0.5 per token, kl_coef 0.1 -> -0.05 on masked tokens; score at the last masked token
    expected = torch.tensor(
        [
            [-0.05, -0.05, -0.05 + 1.0, 0.0],  # last real token at t=2
            [-0.05 + 2.0, 0.0, 0.0, 0.0],  # one-token response
            [0.0, 0.0, 0.0, 0.0],  # empty response gets nothing
        ]
    )
    assert torch.allclose(kl_penalized_rewards(scores, logp, ref, mask, kl_coef=0.1), expected)
    # k3 with logp=0.5, ref=0: (e^-0.5 - 1) + 0.5 = 0.1065307 -> -0.01065307 per token
    k3 = kl_penalized_rewards(scores, logp, ref, mask, kl_coef=0.1, estimator="k3")
    assert k3[0, 0].item() == pytest.approx(-0.01065307, rel=1e-5)
    assert k3[0, 2].item() == pytest.approx(1.0 - 0.01065307, rel=1e-5)


def test_gae_hand_value():
    # 3 real tokens + 1 padded one with junk; gamma 1, lam 0.5; values after the end count as 0
    rewards = torch.tensor([[0.0, 0.0, 1.0, 7.0]])
    values = torch.tensor([[0.5, 0.25, 0.75, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # t=2: delta = 1 + 0 - 0.75 = 0.25;        A2 = 0.25
    # t=1: delta = 0 + 0.75 - 0.25 = 0.5;      A1 = 0.5 + 0.5 * 0.25 = 0.625
    # t=0: delta = 0 + 0.25 - 0.5 = -0.25;     A0 = -0.25 + 0.5 * 0.625 = 0.0625
    # returns = A + V = [0.5625, 0.875, 1.0]
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert torch.allclose(adv, torch.tensor([[0.0625, 0.625, 0.25, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[0.5625, 0.875, 1.0, 0.0]]))


def _naive_gae(rewards, values, mask, gamma, lam):
    """Per-row backward loop over the row's masked positions only."""
    adv = torch.zeros_like(values)
    for b in range(values.shape[0]):
        steps = [t for t in range(values.shape[1]) if mask[b, t]]
        running = 0.0
        for i in reversed(range(len(steps))):
            t = steps[i]
            next_value = values[b, steps[i + 1]].item() if i + 1 < len(steps) else 0.0
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            running = delta + gamma * lam * running
            adv[b, t] = running
    return adv, torch.where(mask.bool(), adv + values, torch.zeros_like(values))


@pytest.mark.parametrize("kind", ["right_padded", "arbitrary"])
def test_gae_matches_naive_loop(kind):
    g = torch.Generator().manual_seed(1)
    B, A = 6, 9
    rewards, values = torch.randn(B, A, generator=g), torch.randn(B, A, generator=g)
    if kind == "right_padded":
        lengths = torch.tensor([9, 1, 0, 5, 7, 3])
        mask = (torch.arange(A)[None] < lengths[:, None]).long()  # ragged, one empty row
    else:
        mask = (torch.rand(B, A, generator=g) > 0.4).long()  # holes: skipped positions
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    nadv, nret = _naive_gae(rewards, values, mask, 0.9, 0.8)
    assert torch.allclose(adv, nadv, atol=1e-5)
    assert torch.allclose(ret, nret, atol=1e-5)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_gae_lambda_one_gamma_one_returns_are_reward_to_go():
    # gamma = lam = 1: returns = sum of future rewards regardless of values: [6, 5, 3]
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    _, ret = gae(rewards, torch.tensor([[4.0, -2.0, 0.5]]), torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert torch.allclose(ret, torch.tensor([[6.0, 5.0, 3.0]]))


def test_explained_variance_hand_value():
    returns = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    values = torch.tensor([[1.0, 2.0, 2.0, -50.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # R - v = [0, 0, 1]: mean 1/3, unbiased var (1/9 + 1/9 + 4/9) / 2 = 1/3; Var[R] = 1 -> 1 - 1/3
    assert explained_variance(values, returns, mask).item() == pytest.approx(2 / 3, rel=1e-5)
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.zeros_like(returns), returns, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_adaptive_kl_controller_hand_values():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    # kl 9: err = 9/6 - 1 = 0.5 -> clipped 0.2; 0.1 * (1 + 0.2 * 256 / 10000) = 0.1005120
    ctl.update(9.0, n_steps=256)
    assert ctl.value == pytest.approx(0.1005120, rel=1e-9)
    low = AdaptiveKLController(0.1, 6.0, 10000)
    # kl 3: err = -0.5 -> clipped -0.2; 0.1 * (1 - 0.2 * 256 / 10000) = 0.0994880
    low.update(torch.tensor(3.0), n_steps=256)
    assert low.value == pytest.approx(0.0994880, rel=1e-9)
    mid = AdaptiveKLController(0.1, 6.0, 10000)
    # kl 6.6: err = 0.1 (inside the clip); 0.1 * (1 + 0.1 * 256 / 10000) = 0.1002560
    mid.update(6.6, n_steps=256)
    assert mid.value == pytest.approx(0.1002560, rel=1e-9)


def test_kl_controllers_state_roundtrip():
    ctl = AdaptiveKLController(0.1, 6.0, 10000)
    ctl.update(9.0, 256)
    state = ctl.state_dict()
    assert all(type(v) is float for v in state.values())
    restored = AdaptiveKLController(0.5, 1.0, 1.0)
    restored.load_state_dict(state)
    ctl.update(7.0, 128)
    restored.update(7.0, 128)
    assert restored.value == ctl.value and restored.value != 0.1005120
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 256)
    assert fixed.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05 and type(fixed.state_dict()["value"]) is float


def test_reinforce_pp_hand_values_whitened_over_the_batch():
    rewards = torch.tensor([[1.0, 0.0, 2.0, 9.0], [0.0, 4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    # gamma 0.5, reward-to-go over masked tokens (the padded 9 is not a step):
    # row 0: R2 = 2; R1 = 0 + 0.5 * 2 = 1; R0 = 1 + 0.5 * 1 = 1.5.  row 1: R1 = 4; R0 = 0 + 0.5 * 4 = 2
    adv, ret = reinforce_pp_advantages(rewards, mask, gamma=0.5)
    assert torch.allclose(ret, torch.tensor([[1.5, 1.0, 2.0, 0.0], [2.0, 4.0, 0.0, 0.0]]))
    # whitened over all 5 masked tokens [1.5, 1, 2, 2, 4]: mean 10.5 / 5 = 2.1,
    # deviations [-0.6, -1.1, -0.1, -0.1, 1.9], squares sum 0.36 + 1.21 + 0.01 + 0.01 + 3.61 = 5.2,
    # unbiased var 5.2 / 4 = 1.3, std 1.140175 -> deviations / 1.140175
    expected = torch.tensor([[-0.526235, -0.964764, -0.087706, 0.0], [-0.087706, 1.666410, 0.0, 0.0]])
    assert torch.allclose(adv, expected, atol=1e-5)
    # batch, not per-row, statistics: row 0 keeps a negative mean
    assert masked_mean(adv[:1], mask[:1]).item() == pytest.approx(-0.6 / 1.140175, rel=1e-4)  # (-0.6-1.1-0.1)/3/std
    assert not adv.requires_grad and not ret.requires_grad


def test_reinforce_pp_matches_naive_loop_with_holes():
    g = torch.Generator().manual_seed(2)
    B, A, gamma = 5, 8, 0.9
    rewards = torch.randn(B, A, generator=g)
    mask = (torch.rand(B, A, generator=g) > 0.4).long()  # holes: skipped positions
    ret = torch.zeros(B, A)
    for b in range(B):
        running = 0.0
        for t in reversed([t for t in range(A) if mask[b, t]]):
            running = rewards[b, t].item() + gamma * running
            ret[b, t] = running
    vals = [ret[b, t].item() for b in range(B) for t in range(A) if mask[b, t]]
    mean, std = statistics.mean(vals), statistics.stdev(vals)
    naive_adv = torch.where(mask.bool(), (ret - mean) / std, torch.zeros_like(ret))
    adv, fast_ret = reinforce_pp_advantages(rewards, mask, gamma=gamma)
    assert torch.allclose(fast_ret, ret, atol=1e-5)
    assert torch.allclose(adv, naive_adv, atol=1e-4)


def test_reinforce_pp_passes_all_reduce_to_the_whitening(monkeypatch):
    seen = {}

    def spy(x, mask, all_reduce=False):
        seen["all_reduce"] = all_reduce
        return x

    monkeypatch.setattr(advantages_module, "masked_whiten", spy)
    reinforce_pp_advantages(torch.ones(1, 2), torch.ones(1, 2), all_reduce=True)
    assert seen == {"all_reduce": True}


# Two groups: 0 = {1, 3}, 1 = {2, 2} (all equal)
SCORES, IDS = torch.tensor([1.0, 3.0, 2.0, 2.0]), torch.tensor([0, 0, 1, 1])


def test_group_advantages_hand_values():
    # group 0: mean 2, unbiased std sqrt(((1-2)^2 + (3-2)^2) / 1) = sqrt 2 -> [-1/sqrt2, 1/sqrt2]; group 1 -> 0
    r = 1 / math.sqrt(2)
    assert torch.allclose(group_advantages(SCORES, IDS, eps=0.0), torch.tensor([-r, r, 0.0, 0.0]))
    assert torch.allclose(group_advantages(SCORES, IDS), torch.tensor([-r, r, 0.0, 0.0]), atol=1e-6)  # eps 1e-6
    # Dr. GRPO: no std -> [1 - 2, 3 - 2, 0, 0]
    assert torch.equal(group_advantages(SCORES, IDS, scale_by_std=False), torch.tensor([-1.0, 1.0, 0.0, 0.0]))
    assert torch.equal(dr_grpo_advantages(SCORES, IDS), torch.tensor([-1.0, 1.0, 0.0, 0.0]))
    # integer 0/1 rewards (a verifier): mean 0.75, unbiased var (0.5625 + 3 * 0.0625) / 3 = 0.25, std 0.5
    out = group_advantages(torch.tensor([0, 1, 1, 1]), torch.zeros(4, dtype=torch.long), eps=0.0)
    assert out.dtype == torch.float32 and torch.equal(out, torch.tensor([-1.5, 0.5, 0.5, 0.5]))


# Non-contiguous ids: group 7 = {1, 2, 6} at 0, 2, 6; group 3 = {1, 1, 1}; group 2 = {5} (size 1)
NC_SCORES, NC_IDS = torch.tensor([1.0, 1.0, 2.0, 1.0, 1.0, 5.0, 6.0]), torch.tensor([7, 3, 7, 3, 3, 2, 7])


def test_group_advantages_non_contiguous_hand_values():
    # group 7: mean 3, deviations [-2, -1, 3], unbiased var (4 + 1 + 9) / 2 = 7 -> / sqrt 7
    s7 = math.sqrt(7)
    expected = torch.tensor([-2 / s7, 0.0, -1 / s7, 0.0, 0.0, 0.0, 3 / s7])
    assert torch.allclose(group_advantages(NC_SCORES, NC_IDS, eps=0.0), expected)
    # Dr. GRPO: [-2, 0, -1, 0, 0, 0, 3]
    assert torch.equal(dr_grpo_advantages(NC_SCORES, NC_IDS), torch.tensor([-2.0, 0, -1, 0, 0, 0, 3]))


def test_rloo_hand_values():
    # k = 2: [1 - 3, 3 - 1] = [-2, 2]; all-equal group -> 0
    assert torch.equal(rloo_advantages(SCORES, IDS), torch.tensor([-2.0, 2.0, 0.0, 0.0]))
    # group 7, k = 3: 1 - (2+6)/2 = -3; 2 - (1+6)/2 = -1.5; 6 - (1+2)/2 = 4.5 (= 3/2 * [-2, -1, 3]);
    # group 3 all equal -> 0; group 2 has size 1: no other sample, no baseline -> 0
    expected = torch.tensor([-3.0, 0.0, -1.5, 0.0, 0.0, 0.0, 4.5])
    assert torch.allclose(rloo_advantages(NC_SCORES, NC_IDS), expected)


def test_all_equal_and_singleton_groups_are_exactly_zero():
    # in float32, sum of seven 0.1 / 7 = 0.1 + 7.45e-9: s - mean is an ulp, not 0, and / (0 + eps) would
    # turn it into -0.00745; the no-signal groups must come out exactly 0 (and never nan with eps = 0)
    scores = torch.tensor([0.1] * 7 + [0.7, 2.0, 5.0])
    ids = torch.tensor([0] * 7 + [1, 2, 2])
    assert (scores[:7] - scores[:7].sum() / 7 != 0).all()  # the rounding this test is about
    for fn in (lambda s, i: group_advantages(s, i, eps=0.0), group_advantages, dr_grpo_advantages, rloo_advantages):
        out = fn(scores, ids)
        assert torch.isfinite(out).all()
        assert torch.equal(out[:8], torch.zeros(8)) and (out[8:] != 0).all()
    assert torch.equal(groups_with_signal(scores, ids), torch.tensor([False] * 8 + [True] * 2))


def _naive_groups(scores, ids):
    groups = {}
    for i, g in enumerate(ids.tolist()):
        groups.setdefault(g, []).append(scores[i].item())
    return groups


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_estimators_match_naive_loops(seed):
    g = torch.Generator().manual_seed(seed)
    B = 24
    ids = torch.randint(0, 6, (B,), generator=g) * 5 + 3  # non-contiguous, unsorted ids 3, 8, ..., 28
    scores = torch.randint(0, 3, (B,), generator=g).float() + torch.randn(B, generator=g) * (seed > 0)
    ids[-1] = 100  # a singleton group
    ids[0] = ids[5] = 101  # a pair with equal scores
    scores[0] = scores[5]
    groups = _naive_groups(scores, ids)
    grpo, dr, rloo, signal = torch.zeros(B), torch.zeros(B), torch.zeros(B), torch.zeros(B, dtype=torch.bool)
    for i, gid in enumerate(ids.tolist()):
        group, s = groups[gid], scores[i].item()
        if len(set(group)) < 2:
            continue  # no signal: all zeros
        mean = statistics.mean(group)
        grpo[i] = (s - mean) / (statistics.stdev(group) + 1e-6)
        dr[i] = s - mean
        rloo[i] = s - (sum(group) - s) / (len(group) - 1)
        signal[i] = True
    assert torch.allclose(group_advantages(scores, ids), grpo, atol=1e-5)
    assert torch.allclose(group_advantages(scores, ids, scale_by_std=False), dr, atol=1e-5)
    assert torch.allclose(rloo_advantages(scores, ids), rloo, atol=1e-5)
    assert torch.equal(groups_with_signal(scores, ids), signal)
    # permuting the batch permutes the advantages (order and contiguity do not matter)
    perm = torch.randperm(B, generator=g)
    assert torch.allclose(group_advantages(scores[perm], ids[perm]), grpo[perm], atol=1e-5)


def test_groups_with_signal_hand_values():
    # group 4 = {1, 2} yes; group 9 = {1, 1} no; group 1 = {3, 3} no; group 5 = {7} (size 1) no
    scores = torch.tensor([1.0, 1.0, 2.0, 1.0, 3.0, 3.0, 7.0])
    ids = torch.tensor([4, 9, 4, 9, 1, 1, 5])
    assert torch.equal(groups_with_signal(scores, ids), torch.tensor([True, False, True, False, False, False, False]))


def test_group_estimators_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(torch.zeros(4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="group_ids"):
        rloo_advantages(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))


def test_estimator_registry_names_the_functions():
    assert ESTIMATORS == {
        "gae": gae,
        "reinforce_pp": reinforce_pp_advantages,
        "grpo": group_advantages,
        "dr_grpo": dr_grpo_advantages,
        "rloo": rloo_advantages,
    }
    for name in ("grpo", "dr_grpo", "rloo"):  # sequence level: (scores, group_ids) -> (B,)
        assert ESTIMATORS[name](SCORES, IDS).shape == (4,)
    unscaled = group_advantages(NC_SCORES, NC_IDS, scale_by_std=False)
    assert torch.equal(ESTIMATORS["dr_grpo"](NC_SCORES, NC_IDS), unscaled)


def test_sequence_kl_sums_the_per_token_estimate_over_the_mask():
    from rlhf_lightning.advantages import sequence_kl

    logp = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-1.5, -1.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # k1 = logp - ref = [0.5, -1.0, (masked)] -> 0.5 - 1.0 = -0.5
    assert sequence_kl(logp, ref, mask, "k1").tolist() == [-0.5]
    # k3 = e^r - 1 - r with r = ref - logp = [-0.5, 1.0]: (e^-0.5 - 0.5) + (e - 2)
    expected = (math.exp(-0.5) - 1 + 0.5) + (math.exp(1.0) - 1 - 1.0)
    assert sequence_kl(logp, ref, mask, "k3").item() == pytest.approx(expected, rel=1e-6)


def test_overlong_penalty_hand_values():
    # budget 10, buffer 4: free up to 6 tokens, then -1/4 per token, -1 at 10 and beyond
    lengths = torch.tensor([0, 6, 7, 8, 10, 12])
    expected = torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0])
    assert torch.equal(advantages_module.overlong_penalty(lengths, max_length=10, buffer=4), expected)
    # buffer = budget: the penalty is the length's share of the budget
    assert torch.allclose(advantages_module.overlong_penalty(torch.tensor([5]), 10, 10), torch.tensor([-0.5]))
    for bad in (0, 11):
        with pytest.raises(ValueError, match="overlong buffer"):
            advantages_module.overlong_penalty(lengths, 10, bad)
