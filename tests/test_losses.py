"""Tests for rlhf_lightning.losses: values worked out by hand, checked against naive code."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from rlhf_lightning.logprobs import masked_mean, seq_mean_token_mean, seq_mean_token_sum_norm
from rlhf_lightning.losses import (
    dpo_loss,
    hinge_loss,
    ipo_loss,
    kl_loss,
    pairwise_loss,
    ppo_policy_loss,
    ppo_value_loss,
    sft_loss,
    simpo_loss,
)

LOG_1P_EXP_M1 = 0.3132617  # -log sigmoid(1) = log(1 + e^-1)


def _assert_detached_scalars(metrics):
    for name, value in metrics.items():
        assert value.dim() == 0 and not value.requires_grad, name


def test_sft_loss_hand_value_and_shift():
    # uniform logits over V=2 -> every scored token has NLL log 2 = 0.693147
    logits = torch.zeros(2, 4, 2, requires_grad=True)
    labels = torch.tensor([[-100, -100, 1, 0], [-100, 1, -100, -100]])  # 2 + 1 scored labels
    loss, metrics = sft_loss(logits, labels)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert metrics["ntokens"].item() == 3
    _assert_detached_scalars(metrics)
    loss.backward()
    # shift: logits at t predict labels[t+1]; row 1 scores only labels[1], i.e. logits[1, 0]
    assert logits.grad[1, 1:].abs().sum() == 0 and logits.grad[1, 0].abs().sum() > 0
    assert logits.grad[0, 3].abs().sum() == 0  # last position predicts nothing
    # With a denominator the summed NLL is divided by it: 3 tokens x log 2 / 4 = 0.519860;
    # the logged metric stays the batch's token mean, log 2.
    loss, metrics = sft_loss(logits, labels, denominator=torch.tensor(4.0))
    assert loss.item() == pytest.approx(3 * math.log(2) / 4, rel=1e-6)
    assert metrics["loss"].item() == pytest.approx(math.log(2), rel=1e-6)


def test_sft_loss_matches_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 10, generator=g)
    labels = torch.randint(0, 10, (3, 6), generator=g)
    labels[0, :3] = -100
    labels[2, 4:] = -100
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 10), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert sft_loss(logits, labels)[0].item() == pytest.approx(expected.item(), rel=1e-5)


def test_pairwise_loss_hand_values():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # pair 1: -log sigma(1) = 0.3132617; pair 2: -log sigma(-1) = 1 + 0.3132617 = 1.3132617; mean 0.8132617
    loss, m = pairwise_loss(rc, rr)
    assert loss.item() == pytest.approx(0.8132617, rel=1e-6)
    assert m["accuracy"].item() == 0.5  # 2 > 1 yes, 0 > 1 no
    assert m["margin"].item() == pytest.approx(0.0)  # (1 + -1) / 2
    assert m["chosen_mean"].item() == 1.0 and m["rejected_mean"].item() == 1.0
    _assert_detached_scalars(m)
    single = pairwise_loss(torch.tensor([2.0]), torch.tensor([1.0]))[0]
    assert single.item() == pytest.approx(LOG_1P_EXP_M1, rel=1e-6)
    # margin 1: -log sigma(2 - 1 - 1) = log 2 = 0.693147
    assert pairwise_loss(torch.tensor([2.0]), torch.tensor([1.0]), margin=1.0)[0].item() == pytest.approx(math.log(2))
    # centering: + 0.01 * (2 + 1)^2 = + 0.09
    centered = pairwise_loss(torch.tensor([2.0]), torch.tensor([1.0]), center_coef=0.01)[0]
    assert centered.item() == pytest.approx(LOG_1P_EXP_M1 + 0.09, rel=1e-6)


# DPO hand case: pi_c=-1, pi_r=-3, ref_c=-2, ref_r=-2 -> h = (-1+2) - (-3+2) = 2
DPO_INPUTS = (torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]))


def test_dpo_loss_hand_value_and_metrics():
    # beta 0.5: beta*h = 1 -> -log sigma(1) = 0.3132617; rewards 0.5*(+1) and 0.5*(-1)
    loss, m = dpo_loss(*DPO_INPUTS, beta=0.5)
    assert loss.item() == pytest.approx(LOG_1P_EXP_M1, rel=1e-6)
    assert m["chosen_reward"].item() == pytest.approx(0.5)
    assert m["rejected_reward"].item() == pytest.approx(-0.5)
    assert m["reward_margin"].item() == pytest.approx(1.0)
    assert m["reward_accuracy"].item() == 1.0
    _assert_detached_scalars(m)


def test_dpo_label_smoothing():
    plain = dpo_loss(*DPO_INPUTS, beta=0.5)[0]
    assert dpo_loss(*DPO_INPUTS, beta=0.5, label_smoothing=0.0)[0].item() == plain.item()
    # eps 0.1: 0.9 * 0.3132617 + 0.1 * (-log sigma(-1) = 1.3132617) = 0.2819355 + 0.1313262 = 0.4132617
    smoothed = dpo_loss(*DPO_INPUTS, beta=0.5, label_smoothing=0.1)[0]
    assert smoothed.item() == pytest.approx(0.4132617, rel=1e-6)


def test_dpo_beta_scaling():
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (torch.randn(5, generator=g) * 3 for _ in range(4))
    # the loss depends on beta * h only: beta 0.2 with logps equals beta 0.1 with 2 * logps
    a, ma = dpo_loss(pc, pr, rc, rr, beta=0.2)
    b, mb = dpo_loss(2 * pc, 2 * pr, 2 * rc, 2 * rr, beta=0.1)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    # implicit rewards are linear in beta
    m3 = dpo_loss(pc, pr, rc, rr, beta=0.6)[1]
    assert m3["reward_margin"].item() == pytest.approx(3 * ma["reward_margin"].item(), rel=1e-5)
    naive = torch.stack([-F.logsigmoid(0.2 * ((pc[i] - rc[i]) - (pr[i] - rr[i]))) for i in range(5)]).mean()
    assert a.item() == pytest.approx(naive.item(), rel=1e-6)


def test_ipo_and_hinge_hand_values():
    # IPO, h = 2: beta 0.5 -> (2 - 1/(2*0.5))^2 = (2 - 1)^2 = 1; beta 0.25 -> (2 - 2)^2 = 0
    assert ipo_loss(*DPO_INPUTS, beta=0.5)[0].item() == pytest.approx(1.0)
    assert ipo_loss(*DPO_INPUTS, beta=0.25)[0].item() == pytest.approx(0.0)
    # hinge, h = 2: beta 0.1 -> relu(1 - 0.2) = 0.8; beta 1 -> relu(1 - 2) = 0
    assert hinge_loss(*DPO_INPUTS, beta=0.1)[0].item() == pytest.approx(0.8)
    loss, m = hinge_loss(*DPO_INPUTS, beta=1.0)
    assert loss.item() == 0.0 and m["reward_margin"].item() == pytest.approx(2.0)  # 1*(1) - 1*(-1)


def test_simpo_hand_value():
    # beta 2, gamma 0.5, pi_c=-0.5, pi_r=-1: 2*(0.5) - 0.5 = 0.5 -> log(1 + e^-0.5) = 0.4740770
    loss, m = simpo_loss(torch.tensor([-0.5]), torch.tensor([-1.0]), beta=2.0, gamma=0.5)
    assert loss.item() == pytest.approx(0.4740770, rel=1e-6)
    assert m["chosen_reward"].item() == -1.0 and m["rejected_reward"].item() == -2.0  # beta * pi
    # reference log-probs are ignored
    with_ref = simpo_loss(torch.tensor([-0.5]), torch.tensor([-1.0]), torch.tensor([5.0]), torch.tensor([-5.0]))[0]
    assert with_ref.item() == loss.item()


def test_preference_loss_attributes():
    assert simpo_loss.reference_free is True and simpo_loss.length_normalized is True
    for fn in (dpo_loss, ipo_loss, hinge_loss):
        assert fn.reference_free is False and fn.length_normalized is False


def _ppo_policy_case():
    # four masked tokens (eps 0.2) and one padded token with an absurd log-ratio
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.0]])
    logprobs = torch.log(ratio)
    logprobs[0, 4] = 100.0  # exp(100) = inf in float32: must not leak into loss or grad
    old = torch.zeros(1, 5)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    return logprobs.requires_grad_(), old, adv, mask


def test_ppo_policy_loss_both_clip_sides():
    logprobs, old, adv, mask = _ppo_policy_case()
    loss, m = ppo_policy_loss(logprobs, old, adv, mask, clip_range=0.2)
    # tok0 A=+1 r=1.5: max(-1.5, -1.2) = -1.2 (clipped, above 1+eps)
    # tok1 A=+1 r=0.5: max(-0.5, -0.8) = -0.5 (unclipped)
    # tok2 A=-1 r=0.5: max( 0.5,  0.8) =  0.8 (clipped, below 1-eps)
    # tok3 A=-1 r=1.5: max( 1.5,  1.2) =  1.5 (unclipped)
    # mean = (-1.2 - 0.5 + 0.8 + 1.5) / 4 = 0.15
    assert loss.item() == pytest.approx(0.15, rel=1e-5)
    assert m["clipfrac"].item() == pytest.approx(0.5)  # tok0 and tok2
    assert m["ratio_mean"].item() == pytest.approx(1.0)  # (1.5 + 0.5 + 0.5 + 1.5) / 4
    assert m["ratio_max"].item() == pytest.approx(1.5)
    # k3: r=1.5 -> 0.5 - log 1.5 = 0.0945349; r=0.5 -> -0.5 + log 2 = 0.1931472; mean 0.1438410
    assert m["approx_kl"].item() == pytest.approx(0.1438410, rel=1e-5)
    _assert_detached_scalars(m)
    loss.backward()
    # d/dlogp of -A r / 4 = -A r / 4 on unclipped tokens, 0 on clipped and padded ones
    expected_grad = torch.tensor([[0.0, -0.5 / 4, 0.0, 1.5 / 4, 0.0]])
    assert torch.allclose(logprobs.grad, expected_grad, atol=1e-6)


def test_ppo_policy_loss_ratio_one_is_minus_mean_advantage():
    adv = torch.tensor([[1.0, -3.0, 2.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    lp = torch.randn(2, 3)
    loss, m = ppo_policy_loss(lp, lp.clone(), adv, mask)
    assert loss.item() == pytest.approx(-(1 - 3 + 2 + 4) / 4)  # token mean over 4 masked tokens = -1
    assert m["clipfrac"].item() == 0.0 and m["approx_kl"].item() == 0.0


def test_ppo_value_loss_both_clip_sides():
    old = torch.zeros(1, 5)
    values = torch.tensor([[1.0, -1.0, 0.1, 1.0, 7.0]])
    returns = torch.tensor([[1.0, -1.0, 1.0, 0.0, -7.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    # c = 0.2, v_clip = clip(v, -0.2, 0.2) since old = 0
    # tok0 v=1,   R=1:  (0)^2 vs (0.2-1)^2 = 0.64 -> 0.64 (clipped, upper side)
    # tok1 v=-1,  R=-1: (0)^2 vs (-0.2+1)^2 = 0.64 -> 0.64 (clipped, lower side)
    # tok2 v=0.1, R=1:  0.81 vs 0.81 -> 0.81 (equal: not counted as clipped)
    # tok3 v=1,   R=0:  1 vs 0.04 -> 1 (unclipped)
    # loss = 0.5 * (0.64 + 0.64 + 0.81 + 1) / 4 = 0.38625
    loss, m = ppo_value_loss(values, old, returns, mask, clip_range_value=0.2)
    assert loss.item() == pytest.approx(0.38625, rel=1e-5)
    assert m["vf_clipfrac"].item() == pytest.approx(0.5)
    _assert_detached_scalars(m)
    # no clipping: 0.5 * (0 + 0 + 0.81 + 1) / 4 = 0.22625
    loss, m = ppo_value_loss(values, old, returns, mask, clip_range_value=None)
    assert loss.item() == pytest.approx(0.22625, rel=1e-5)
    assert m["vf_clipfrac"].item() == 0.0


def test_ppo_policy_loss_defaults_are_the_original_formula_bit_for_bit():
    g = torch.Generator().manual_seed(3)
    lp, old = torch.randn(4, 7, generator=g) * 0.4, torch.randn(4, 7, generator=g) * 0.4
    adv, mask = torch.randn(4, 7, generator=g), torch.rand(4, 7, generator=g) > 0.3
    loss, m = ppo_policy_loss(lp, old, adv, mask)
    ratio = torch.exp(torch.where(mask, lp - old, torch.zeros_like(lp)))
    original = masked_mean(torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - 0.2, 1.0 + 0.2)), mask)
    assert torch.equal(loss, original)
    explicit, m2 = ppo_policy_loss(lp, old, adv, mask, 0.2, clip_range_high=0.2, aggregate=masked_mean)
    assert torch.equal(explicit, loss) and all(torch.equal(m[k], m2[k]) for k in m)
    assert m["clipfrac"].item() == pytest.approx(m["clipfrac_low"].item() + m["clipfrac_high"].item())


def test_ppo_policy_loss_clip_higher_by_hand():
    ratio = torch.tensor([[1.25, 0.5]])
    logprobs, old = torch.log(ratio).requires_grad_(), torch.zeros(1, 2)
    adv, mask = torch.tensor([[2.0, -1.0]]), torch.ones(1, 2)
    # clip_range 0.2, clip_range_high 0.28: clip to [0.8, 1.28]
    # tok0 A=+2 r=1.25 inside: max(-2 * 1.25, -2 * 1.25) = -2.5 (unclipped: 1.25 A)
    # tok1 A=-1 r=0.5 below 0.8: max(0.5, 0.8) = 0.8 (clipped, low side)
    # mean = (-2.5 + 0.8) / 2 = -0.85
    loss, m = ppo_policy_loss(logprobs, old, adv, mask, clip_range=0.2, clip_range_high=0.28)
    assert loss.item() == pytest.approx(-0.85, rel=1e-6)
    assert m["clipfrac"].item() == 0.5 and m["clipfrac_low"].item() == 0.5 and m["clipfrac_high"].item() == 0.0
    _assert_detached_scalars(m)
    loss.backward()
    # d/dlogp of -A r / 2 on tok0 = -2 * 1.25 / 2 = -1.25; tok1 clipped -> 0
    assert torch.allclose(logprobs.grad, torch.tensor([[-1.25, 0.0]]))
    # symmetric 0.2: tok0 clipped at 1.2 -> max(-2.5, -2.4) = -2.4 (1.2 A); mean (-2.4 + 0.8) / 2 = -0.8
    loss, m = ppo_policy_loss(logprobs.detach(), old, adv, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(-0.8, rel=1e-6)
    assert m["clipfrac"].item() == 1.0 and m["clipfrac_low"].item() == 0.5 and m["clipfrac_high"].item() == 0.5


def test_ppo_policy_loss_aggregates():
    # ratio 1 everywhere -> per-token loss -A
    adv = torch.tensor([[1.0, -3.0, 2.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    lp = torch.randn(2, 3)
    # GRPO: row means -(1 - 3 + 2)/3 = 0 and -4/1 -> (0 - 4) / 2 = -2
    loss, m = ppo_policy_loss(lp, lp.clone(), adv, mask, aggregate=seq_mean_token_mean)
    assert loss.item() == pytest.approx(-2.0)
    assert m["policy_loss"].item() == pytest.approx(-2.0)
    assert m["ratio_mean"].item() == 1.0 and m["clipfrac"].item() == 0.0  # metrics stay token means
    # Dr. GRPO with norm 4 bound by functools.partial: row sums 0/4 and -4/4 -> (0 - 1) / 2 = -0.5
    dr_grpo = functools.partial(seq_mean_token_sum_norm, norm=4)
    assert ppo_policy_loss(lp, lp.clone(), adv, mask, aggregate=dr_grpo)[0].item() == pytest.approx(-0.5)


def test_kl_loss_k1_k3_by_hand_and_gradient_to_logprobs_only():
    # tok0: pi 0.5, ref 0.25 -> log r = log 0.5; tok1: pi 0.5, ref 1 -> log r = log 2;
    # tok2 padded with values whose exp overflows float32 (exp(200) = inf)
    logprobs = torch.tensor([[math.log(0.5), math.log(0.5), -100.0]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25), 0.0, 100.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    # k1 = log pi - log ref: log 2 = 0.693147 and -log 2 -> mean 0; gradient 1 / 2 per token
    loss, m = kl_loss(logprobs, ref, mask, estimator="k1")
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and m["kl"].item() == loss.item()
    _assert_detached_scalars(m)
    loss.backward()
    assert torch.allclose(logprobs.grad, torch.tensor([[0.5, 0.5, 0.0]]))
    assert ref.grad is None
    logprobs.grad = None
    # k3 = r - 1 - log r: r = 0.5 -> -0.5 + 0.693147 = 0.193147; r = 2 -> 1 - 0.693147 = 0.306853
    # mean (0.193147 + 0.306853) / 2 = 0.25; gradient (1 - r) / 2 = [0.25, -0.5]
    loss, _ = kl_loss(logprobs, ref, mask)
    assert loss.item() == pytest.approx(0.25, rel=1e-6)
    loss.backward()
    assert torch.allclose(logprobs.grad, torch.tensor([[0.25, -0.5, 0.0]]))
    assert ref.grad is None and torch.isfinite(logprobs.grad).all()


def test_kl_loss_aggregate_and_bad_estimator():
    logprobs = torch.tensor([[math.log(0.5), math.log(0.5)], [math.log(0.5), 0.0]])
    ref = torch.tensor([[math.log(0.25), 0.0], [math.log(0.25), 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    # k3 per token: [[0.193147, 0.306853], [0.193147, -]]; GRPO: (0.25 + 0.193147) / 2 = 0.2215735
    loss, _ = kl_loss(logprobs, ref, mask, aggregate=seq_mean_token_mean)
    assert loss.item() == pytest.approx(0.2215735, rel=1e-6)
    # token mean: (0.193147 + 0.306853 + 0.193147) / 3 = 0.2310490
    assert kl_loss(logprobs, ref, mask)[0].item() == pytest.approx(0.2310490, rel=1e-6)
    with pytest.raises(ValueError, match="k4"):
        kl_loss(logprobs, ref, mask, estimator="k4")
