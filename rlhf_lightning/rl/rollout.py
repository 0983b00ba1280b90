"""The online-RL rollout record and the buffer that turns rollouts into shuffled minibatches.

A :class:`Rollout` holds one batch of generated experience, every tensor indexed by
sample in dimension 0. :class:`RolloutBuffer` collects rollouts, concatenates them
(padding queries on the left and responses on the right to the widest) and yields
minibatches for several PPO epochs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from rlhf_lightning.generation import Generation

__all__ = ["Rollout", "RolloutBuffer"]

# How each field is padded when rollouts of different widths are concatenated.
_QUERY_FIELDS = ("query_ids", "query_mask")  # left-padded
_RESPONSE_FIELDS = (
    "response_ids",
    "response_mask",
    "logprobs",
    "ref_logprobs",
    "values",
    "rewards",
    "advantages",
    "returns",
)  # right-padded
_ID_FIELDS = ("query_ids", "response_ids")  # padded with the pad token id; the others with 0


@dataclass
class Rollout:
    """One batch of PPO experience. ``B`` samples, ``Q`` query and ``A`` response tokens."""

    query_ids: torch.Tensor  # (B, Q) prompt token ids, left-padded
    query_mask: torch.Tensor  # (B, Q) 1 on real prompt tokens, 0 on left padding
    response_ids: torch.Tensor  # (B, A) sampled ids, right-padded; tokens after EOS replaced by pad
    response_mask: torch.Tensor  # (B, A) 1 on real response tokens up to and including EOS
    logprobs: torch.Tensor | None = None  # (B, A) log-probs under the rollout (old) policy
    ref_logprobs: torch.Tensor | None = None  # (B, A) log-probs under the frozen reference
    values: torch.Tensor | None = None  # (B, A) critic values at rollout time
    scores: torch.Tensor | None = None  # (B,) reward-model score after any penalty (e.g. no EOS)
    group_ids: torch.Tensor | None = None  # (B,) samples of the same prompt share an id
    prompts: list[str] | None = None  # (B,) prompt texts (for reward functions and sample logs)
    rewards: torch.Tensor | None = None  # (B, A) KL-penalised per-token rewards
    advantages: torch.Tensor | None = None  # (B, A) GAE advantages (whitened or not)
    returns: torch.Tensor | None = None  # (B, A) GAE returns, value targets

    def _tensors(self) -> dict[str, torch.Tensor | None]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def batch_size(self) -> int:
        """Number of samples ``B``."""
        return self.query_ids.shape[0]

    def __len__(self) -> int:
        return self.batch_size

    @property
    def query_width(self) -> int:
        """``Q``: the column where responses start in :meth:`sequences`."""
        return self.query_ids.shape[1]

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, Q+A)`` query+response ids and their attention mask (left- and right-padded)."""
        ids = torch.cat([self.query_ids, self.response_ids], dim=1)  # (B, Q+A)
        mask = torch.cat([self.query_mask, self.response_mask], dim=1)  # (B, Q+A)
        return ids, mask

    def to(self, device: torch.device | str) -> Rollout:
        """A copy with every tensor moved to ``device``."""
        return Rollout(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self._tensors().items()})

    def select(self, indices: torch.Tensor | Sequence[int]) -> Rollout:
        """A Rollout with the rows ``indices`` (in that order) of every field."""
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.query_ids.device)

        def rows(v):
            if v is None:
                return None
            return [v[i] for i in idx.tolist()] if isinstance(v, list) else v[idx]

        return Rollout(**{k: rows(v) for k, v in self._tensors().items()})

    def generation(self) -> Generation:
        """The responses as a :class:`~rlhf_lightning.generation.Generation` (for decoding)."""
        return Generation(self.response_ids, self.response_mask, self.response_mask.bool().any(-1))

    @classmethod
    def cat(cls, rollouts: Sequence[Rollout], pad_token_id: int = 0) -> Rollout:
        """Concatenate rollouts along the batch dimension.

        Queries are left-padded and responses right-padded to the widest; id fields are
        padded with ``pad_token_id``, masks and float fields with 0. An optional field
        must be set in all rollouts or in none.

        Args:
            rollouts: non-empty sequence of Rollouts.
            pad_token_id: id used to pad ``query_ids`` and ``response_ids``.

        Returns:
            The concatenated Rollout.
        """
        if not rollouts:
            raise ValueError("Rollout.cat needs at least one rollout")
        merged: dict[str, torch.Tensor | None] = {}
        for f in dataclasses.fields(cls):
            parts = [getattr(r, f.name) for r in rollouts]
            if all(p is None for p in parts):
                merged[f.name] = None
                continue
            if any(p is None for p in parts):
                raise ValueError(f"field {f.name!r} is set in some rollouts and None in others")
            if isinstance(parts[0], list):
                merged[f.name] = [x for p in parts for x in p]
                continue
            if f.name in _QUERY_FIELDS or f.name in _RESPONSE_FIELDS:
                width = max(p.shape[1] for p in parts)
                fill = pad_token_id if f.name in _ID_FIELDS else 0
                left = f.name in _QUERY_FIELDS
                parts = [_pad_to(p, width, fill, left) for p in parts]
            merged[f.name] = torch.cat(parts, dim=0)
        return cls(**merged)


def _pad_to(x: torch.Tensor, width: int, fill: float, left: bool) -> torch.Tensor:
    """Pad ``(B, W)`` to ``(B, width)`` with ``fill`` on the left or the right."""
    extra = width - x.shape[1]
    if extra == 0:
        return x
    pad = torch.full((x.shape[0], extra), fill, dtype=x.dtype, device=x.device)
    return torch.cat([pad, x] if left else [x, pad], dim=1)


class RolloutBuffer:
    """Stores rollouts and yields shuffled minibatches for several PPO epochs.

    Args:
        pad_token_id: id used to pad query/response ids when rollouts differ in width.

    Example::

        buffer = RolloutBuffer(pad_token_id=tokenizer.pad_token_id)
        buffer.add(rollout)
        for mb in buffer.minibatches(8, epochs=4, generator=torch.Generator().manual_seed(0)):
            ...
    """

    def __init__(self, pad_token_id: int = 0) -> None:
        self.pad_token_id = pad_token_id
        self._rollouts: list[Rollout] = []
        self._merged: Rollout | None = None

    def add(self, rollout: Rollout) -> None:
        """Append a rollout."""
        self._rollouts.append(rollout)
        self._merged = None

    def __len__(self) -> int:
        """Number of samples stored."""
        return sum(r.batch_size for r in self._rollouts)

    def clear(self) -> None:
        """Drop every stored rollout."""
        self._rollouts.clear()
        self._merged = None

    def snapshot(self) -> list[Rollout]:
        """The stored rollouts as of now, for :meth:`state_dict` later (stored rollouts are never
        changed in place: ``clear`` empties the buffer's own list, ``all`` builds a new one)."""
        return list(self._rollouts)

    def state_dict(
        self, rollouts: list[Rollout] | None = None
    ) -> dict[str, list[dict[str, torch.Tensor | list[str] | None]]]:
        """The stored rollouts (or a :meth:`snapshot`'s) as plain fields on the CPU, for checkpoints."""
        return {"rollouts": [r.to("cpu")._tensors() for r in (self._rollouts if rollouts is None else rollouts)]}

    def load_state_dict(self, state: dict[str, list[dict[str, torch.Tensor | list[str] | None]]]) -> None:
        self._rollouts = [Rollout(**fields) for fields in state["rollouts"]]
        self._merged = None

    def to(self, device: torch.device | str) -> None:
        """Move the stored rollouts to ``device`` (after loading them from a checkpoint)."""
        self._rollouts = [r.to(device) for r in self._rollouts]
        self._merged = None

    def all(self) -> Rollout:
        """All stored samples as one Rollout (cached until the next ``add``/``clear``)."""
        if not self._rollouts:
            raise ValueError("the rollout buffer is empty")
        if self._merged is None:
            self._merged = Rollout.cat(self._rollouts, pad_token_id=self.pad_token_id)
        return self._merged

    def minibatches(
        self,
        minibatch_size: int,
        epochs: int = 1,
        generator: torch.Generator | None = None,
        shuffle: bool = True,
    ) -> Iterator[Rollout]:
        """Yield minibatches: each epoch a fresh permutation split into chunks.

        Every sample appears exactly once per epoch; the last, smaller minibatch is
        yielded too. Pass a seeded CPU ``torch.Generator`` for a reproducible order.

        Args:
            minibatch_size: samples per minibatch (positive).
            epochs: passes over the buffer.
            generator: source of the permutations (global RNG if None).
            shuffle: if False, keep the stored order.
        """
        if minibatch_size <= 0:
            raise ValueError(f"minibatch_size must be positive, got {minibatch_size}")
        data = self.all()
        n = data.batch_size
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
            for start in range(0, n, minibatch_size):
                yield data.select(order[start : start + minibatch_size])
