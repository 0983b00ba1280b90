"""Tests for rlhf_lightning.advantages: hand values, naive loops, KL controllers."""

import math

import pytest
import torch

from rlhf_lightning.advantages import (
    AdaptiveKLController,
    FixedKLController,
    explained_variance,
    gae,
    kl_penalized_rewards,
    kl_per_token,
)


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
