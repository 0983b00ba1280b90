"""Samplers for training data: a seeded shuffle per epoch, length-grouped batches, exact token
accounting per optimizer step, and batches that resume mid-epoch.

Every training order is a pure function of ``(seed, epoch)`` (:func:`epoch_generator`), so a
resumed run draws the very same order as an uninterrupted one; Lightning sets the epoch
(``set_epoch``) and :class:`ResumableDataLoader` skips the batches a checkpoint had
already trained on. ``LengthGroupedSampler`` draws batches of similar lengths (less
padding). ``TokenWindowSampler`` tags each example with the number of scored tokens of its
optimizer step, so the SFT loss can divide by it and gradient accumulation is exact.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from rlhf_lightning.data.collate import IGNORE_INDEX


def scored_tokens(features: dict[str, Any]) -> int:
    """Label tokens an SFT example contributes to the loss (labels are shifted by one)."""
    return sum(1 for label in features["labels"][1:] if label != IGNORE_INDEX)


def example_length(features: dict[str, Any]) -> int:
    """Tokens of the longest sequence in a feature dict (both sides of a preference pair)."""
    return max(len(v) for k, v in features.items() if k.endswith("input_ids"))


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A generator seeded from ``(seed, epoch)`` alone: epoch ``e``'s shuffle never depends on
    how many epochs this process has run (seeds ``(0, 1)`` and ``(1, 0)`` differ too)."""
    digest = hashlib.sha256(f"{seed}:{epoch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _set_epoch(sampler: Any, epoch: int) -> None:
    set_epoch = getattr(sampler, "set_epoch", None)
    if callable(set_epoch):
        set_epoch(epoch)


class EpochShuffleSampler(Sampler[int]):
    """A random permutation of ``range(n)`` that is a function of ``(seed, epoch)`` only."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=epoch_generator(self.seed, self.epoch)).tolist())


class LengthGroupedSampler(Sampler[int]):
    """Shuffled indices in which each run of ``chunk`` consecutive indices has similar lengths.

    Each epoch: a random permutation cut into mega-batches that are sorted by length
    (``transformers.trainer_pt_utils.get_length_grouped_indices``), then cut into chunks of
    ``chunk`` indices whose order is shuffled too, so batch lengths do not cycle from long to
    short; the chunk holding the longest example stays first (out-of-memory shows at once).
    Under DDP, ``chunk`` should be ``batch_size x world_size``: Lightning deals the indices
    to ranks in turn, so each rank's batch then comes from one chunk.

    Args:
        lengths: length of every example.
        chunk: indices per group (a global batch).
        generator: drives both shuffles; seed it identically on every rank.
        seed: instead of ``generator``: each epoch's shuffles come from
            :func:`epoch_generator` ``(seed, epoch)`` (resumable; Lightning sets the epoch).
    """

    def __init__(
        self, lengths: list[int], chunk: int, generator: torch.Generator | None = None, seed: int | None = None
    ):
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.lengths = list(lengths)
        self.chunk = chunk
        self.generator = generator
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        if not self.lengths:
            return iter([])
        generator = self.generator if self.seed is None else epoch_generator(self.seed, self.epoch)
        order = get_length_grouped_indices(self.lengths, self.chunk, generator=generator)
        chunks = [order[i : i + self.chunk] for i in range(0, len(order), self.chunk)]
        first = max(range(len(chunks)), key=lambda c: max(self.lengths[i] for i in chunks[c]))
        rest = [c for c in range(len(chunks)) if c != first]
        rest = [rest[j] for j in torch.randperm(len(rest), generator=generator).tolist()]
        return iter([i for c in [first, *rest] for i in chunks[c]])


class TokenWindowSampler(Sampler[tuple[int, float]]):
    """Tags every index with the loss denominator that makes gradient accumulation exact.

    An optimizer step sees ``window = batch_size x world_size x accumulate`` consecutive
    indices of the wrapped sampler's order (Lightning deals them to ranks in turn, each rank
    accumulates ``accumulate`` micro-batches, DDP averages the ranks). If each micro-batch's
    *summed* token loss is divided by ``N_window / (world_size x accumulate)``, where
    ``N_window`` is the scored tokens of the whole window, the step's gradient is exactly
    that of the token mean over the window, however unevenly tokens fall into micro-batches
    (a per-micro-batch mean would weight a short micro-batch's tokens more). A last, shorter
    window at the end of the epoch gets its own ``N``. Under DDP the order is padded to a
    multiple of ``world_size`` here (repeating its start), so the distributed wrapper adds
    nothing that the counts do not know of.

    Yields ``(index, denominator)``; :class:`WindowedFeatures` attaches the denominator to
    the example.
    """

    def __init__(
        self, base: Sampler[int], counts: list[int], batch_size: int, accumulate: int = 1, world_size: int = 1
    ):
        self.base, self.counts = base, list(counts)
        self.batch_size, self.accumulate, self.world_size = batch_size, max(1, accumulate), max(1, world_size)

    def set_epoch(self, epoch: int) -> None:
        _set_epoch(self.base, epoch)

    def __len__(self) -> int:
        n = len(self.base)
        return n + (-n) % self.world_size

    def __iter__(self):
        order = list(self.base)
        order += order[: (-len(order)) % self.world_size]
        window = self.batch_size * self.world_size * self.accumulate
        share = self.world_size * self.accumulate
        out = []
        for start in range(0, len(order), window):
            part = order[start : start + window]
            denominator = max(sum(self.counts[i] for i in part), 1) / share
            out += [(i, denominator) for i in part]
        return iter(out)


class RankShare(DistributedSampler):
    """This rank's share of another sampler's order, dealt in turn: indices ``rank``,
    ``rank + world``, ... of it (padded with its start to a multiple of ``world``).

    Lightning wraps a custom sampler in its ``DistributedSamplerWrapper`` under any
    distributed strategy, and that wrapper *reshuffles* the sampler's order (training
    loaders are always marked shuffled), which breaks length-grouped chunks and
    token-accounting windows. A ``DistributedSampler`` is left in place, so the data
    modules wrap their own samplers in this one.
    """

    def __init__(self, sampler: Sampler[Any], num_replicas: int, rank: int):
        # DistributedSampler's __init__ wants a dataset and would shuffle; only its type is needed.
        self.sampler, self.num_replicas, self.rank, self.epoch = sampler, num_replicas, rank, 0
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} out of range for {num_replicas} replicas")

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.num_replicas)

    def __iter__(self):
        order = list(self.sampler)
        order += order[: (-len(order)) % self.num_replicas]
        return iter(order[self.rank :: self.num_replicas])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


class WindowedFeatures(Dataset):
    """Features looked up by ``(index, denominator)`` keys, with ``loss_denominator`` added."""

    def __init__(self, features: list[dict[str, Any]]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, key: tuple[int, float]) -> dict[str, Any]:
        index, denominator = key
        return {**self.features[index], "loss_denominator": denominator}


class ResumableDataLoader(DataLoader):
    """Training batches whose position a checkpoint carries and a resumed run starts from.

    Lightning saves ``state_dict()`` of a training loader that has one in every checkpoint
    and calls ``load_state_dict`` on resume before the first batch is drawn. The state is
    the epoch and the number of its batches already trained on, as the Trainer counts them
    (``progress``, given by the DataModule); the order of an epoch is a function of the
    epoch alone (:func:`epoch_generator`), so the resumed pass sets the sampler's epoch and
    skips that many batches of it, once.

    Args:
        progress: returns ``(epoch, batches of it trained)``; None: always ``(0, 0)``.
        *args, **kwargs: those of ``DataLoader``.
    """

    def __init__(self, *args: Any, progress: Callable[[], tuple[int, int]] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.progress = progress
        self._skip = 0

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self.progress() if self.progress is not None else (0, 0)
        if batches >= len(self):  # saved at the end of an epoch: the next one starts afresh
            epoch, batches = epoch + 1, 0
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # Lightning wraps the sampler under DDP; the wrapper passes the epoch on.
        for sampler in {id(s): s for s in (self.sampler, getattr(self.batch_sampler, "sampler", None))}.values():
            _set_epoch(sampler, state["epoch"])
        self._skip = state["batches"]

    def __iter__(self):
        iterator = super().__iter__()
        skip, self._skip = self._skip, 0
        for _ in range(skip):  # the batches the checkpoint had trained on
            next(iterator)
        return iterator
