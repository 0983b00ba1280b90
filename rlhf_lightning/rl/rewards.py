"""Where online RL gets its scores: a reward-model export, reward functions, or both summed.

A *reward function* is any ``module:function`` taking ``(prompts, responses)`` (two lists of
strings of the same length) and returning one number per response — a checker of the
answer ("verifiable reward"), a heuristic, a gold judge. Every return is validated: a
wrong length, a non-number or a non-finite value stops the run with an error that names
the function, so a broken reward never turns silently into a gradient.

:class:`RewardSources` sums ``weight * score`` over its sources and reports each
source's mean, so a dashboard shows which one moves.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rlhf_lightning.importing import import_callable


@dataclass
class RewardFunctionSpec:
    """A reward function as configs name it.

    Attributes:
        function: ``"package.module:function"`` with signature ``(prompts, responses) -> list[float]``
            (or ``(prompt, response) -> float`` with ``batched: false``).
        weight: its weight in the sum of sources.
        batched: whether the function takes whole lists (True) or one pair at a time.
        name: its metric name (default: the function's name).
    """

    function: str
    weight: float = 1.0
    batched: bool = True
    name: str | None = None


class RewardFunction:
    """A validated reward function (see the module docstring)."""

    def __init__(self, spec: RewardFunctionSpec):
        self.spec = spec
        self.fn: Callable = import_callable(spec.function)
        self.name = spec.name or self.fn.__name__

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """``(B,)`` float32 scores; raises ``ValueError`` naming the function on a bad return."""
        if self.spec.batched:
            out = self.fn(list(prompts), list(responses))
        else:
            out = [self.fn(p, r) for p, r in zip(prompts, responses, strict=True)]
        return validate_scores(out, len(responses), f"reward function {self.spec.function!r}")


def validate_scores(out, n: int, what: str) -> torch.Tensor:
    """``out`` as a ``(n,)`` float32 tensor, or a ``ValueError`` saying what is wrong with it."""
    if isinstance(out, torch.Tensor):
        out = out.detach().flatten().tolist()
    if isinstance(out, (str, bytes)) or not isinstance(out, Sequence):
        raise ValueError(f"{what} returned a {type(out).__name__}; expected a list of {n} numbers")
    if len(out) != n:
        raise ValueError(f"{what} returned {len(out)} values for {n} responses")
    for i, v in enumerate(out):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ValueError(f"{what} returned {v!r} ({type(v).__name__}) at index {i}; expected a number")
        if not math.isfinite(float(v)):
            raise ValueError(f"{what} returned {v} at index {i}; scores must be finite")
    return torch.tensor([float(v) for v in out], dtype=torch.float32)


class RewardSources:
    """The weighted sum of a frozen reward model (optional) and reward functions (optional).

    Args:
        reward_model: a ``models.RewardModel`` (read at the last real token, normalised as
            its export says), or None.
        reward_model_weight: its weight.
        functions: reward-function specs.
    """

    def __init__(
        self,
        reward_model: nn.Module | None = None,
        reward_model_weight: float = 1.0,
        functions: Sequence[RewardFunctionSpec] = (),
    ):
        if reward_model is None and not functions:
            raise ValueError("no reward source: give a reward model, reward functions, or both")
        self.reward_model = reward_model
        self.reward_model_weight = reward_model_weight
        # Specs from YAML or the command line may arrive as plain mappings.
        self.functions = [
            RewardFunction(s if isinstance(s, RewardFunctionSpec) else RewardFunctionSpec(**s)) for s in functions
        ]

    @torch.no_grad()
    def __call__(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scores ``(B,)`` of query+response sequences (``input_ids`` for the model, texts for the functions).

        Returns ``(scores, metrics)``; metrics hold each source's mean score as
        ``score_<name>`` (``score_reward_model`` for the model).
        """
        parts: list[tuple[float, torch.Tensor]] = []
        metrics: dict[str, torch.Tensor] = {}
        if self.reward_model is not None:
            s = self.reward_model(input_ids, attention_mask).float()  # (B,)
            metrics["score_reward_model"] = s.mean()
            parts.append((self.reward_model_weight, s))
        for fn in self.functions:
            s = fn(prompts, responses).to(input_ids.device)  # (B,)
            metrics[f"score_{fn.name}"] = s.mean()
            parts.append((fn.spec.weight, s))
        total = parts[0][0] * parts[0][1]  # (B,)
        for weight, s in parts[1:]:
            total = total + weight * s
        return total, metrics


torch.serialization.add_safe_globals([RewardFunctionSpec])
