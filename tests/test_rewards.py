"""Reward sources for online RL: validated reward functions, a reward model, their weighted sum."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_lightning.rl.rewards import RewardFunction, RewardFunctionSpec, RewardSources

PROMPTS = ["a", "bb", "ccc"]
RESPONSES = [" x", " yy", " zzz"]


def length_reward(prompts, responses):
    return [float(len(r)) for r in responses]


def pair_reward(prompt, response):
    return len(prompt) - len(response)


def wrong_length(prompts, responses):
    return [0.0]


def returns_string(prompts, responses):
    return ["1.0", 2.0, 3.0]


def returns_nan(prompts, responses):
    return [1.0, math.nan, 0.0]


def returns_bool(prompts, responses):
    return [True, 0.0, 1.0]


def returns_scalar(prompts, responses):
    return 1.0


def returns_text(prompts, responses):
    return "good"


def _spec(name, **kw):
    return RewardFunctionSpec(function=f"{__name__}:{name}", **kw)


def test_batched_and_per_pair_functions():
    assert RewardFunction(_spec("length_reward"))(PROMPTS, RESPONSES).tolist() == [2.0, 3.0, 4.0]
    # per pair: len(prompt) - len(response) = 1-2, 2-3, 3-4
    assert RewardFunction(_spec("pair_reward", batched=False))(PROMPTS, RESPONSES).tolist() == [-1.0, -1.0, -1.0]


@pytest.mark.parametrize(
    "name, message",
    [
        ("wrong_length", r"returned 1 values for 3 responses"),
        ("returns_string", r"returned '1\.0' \(str\) at index 0; expected a number"),
        ("returns_nan", r"returned nan at index 1; scores must be finite"),
        ("returns_bool", r"returned True \(bool\) at index 0"),
        ("returns_scalar", r"returned a float; expected a list of 3 numbers"),
        ("returns_text", r"returned a str; expected a list of 3 numbers"),
    ],
)
def test_bad_returns_name_the_function(name, message):
    with pytest.raises(ValueError, match=rf"reward function '{__name__}:{name}' {message}"):
        RewardFunction(_spec(name))(PROMPTS, RESPONSES)


def test_unknown_function_is_named():
    with pytest.raises(ValueError, match=r"has no attribute 'nope'"):
        RewardFunction(_spec("nope"))


class ConstantModel(torch.nn.Module):
    def forward(self, input_ids, attention_mask):
        return attention_mask.sum(-1).float()  # (B,) the number of real tokens


def test_weighted_sum_of_model_and_functions():
    ids = torch.ones(3, 4, dtype=torch.long)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    sources = RewardSources(ConstantModel(), 0.5, [_spec("length_reward", weight=2.0)])
    scores, metrics = sources(PROMPTS, RESPONSES, ids, mask)
    # 0.5 * [2, 3, 4] (tokens) + 2.0 * [2, 3, 4] (characters) = [5, 7.5, 10]
    assert scores.tolist() == [5.0, 7.5, 10.0]
    assert metrics["score_reward_model"].item() == 3.0 and metrics["score_length_reward"].item() == 3.0


def test_no_source_is_an_error():
    with pytest.raises(ValueError, match="no reward source"):
        RewardSources()
