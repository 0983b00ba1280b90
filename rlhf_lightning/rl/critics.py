"""Critics for online RL: interchangeable parts that give a value per response token.

* :class:`SeparateCritic`: its own model (a reward-model export: the values start on the
  reward's normalised scale, so they predict the returns from step 0);
* :class:`ValueHeadCritic`: a zero-initialised linear head on the policy's last hidden
  states (one model less in memory and compute);
* none: critic-free estimators (GRPO, RLOO, REINFORCE++) need no values.

Both return ``(B, A)`` float32 values for the response columns of query+response
sequences (``response_start = Q``): position ``Q - 1 + t`` is the state before token ``t``.
"""

from __future__ import annotations

import torch

from rlhf_lightning.models import RewardModel, ValueHead


class SeparateCritic(RewardModel):
    """A critic model of its own, with the reward model's architecture and score head."""

    needs_hidden = False
    fsdp_forward_methods = ("values",)  # called in place of forward (models.sharding.shard)

    @classmethod
    def from_reward_model(cls, rm: RewardModel) -> SeparateCritic:
        return cls(rm.model, normalize=rm.normalize)

    def values(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_start: int,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(B, A)`` values at the positions that predict each response token."""
        return self.token_values(input_ids, attention_mask)[:, response_start - 1 : -1].float()  # (B, A)


class ValueHeadCritic(ValueHead):
    """A value head on the policy: reads the policy's hidden states, adds no forward pass."""

    needs_hidden = True

    def values(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_start: int,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(B, A)`` values from ``hidden``, the policy's ``(B, A, H)`` last hidden states."""
        if hidden is None:
            raise ValueError("ValueHeadCritic needs the policy's hidden states")
        return self(hidden).float()  # (B, A)
