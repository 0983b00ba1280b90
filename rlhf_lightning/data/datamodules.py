"""LightningDataModules for every stage: SFT, preferences (reward model, DPO) and prompts (PPO).

Each module loads its tokenizer in ``__init__`` (so a LightningModule can read
``datamodule.tokenizer`` before the weights are built), and in ``setup`` reads, validates,
splits and tokenises the data once. A subclass only names the record kind, the tokenise
function and the collator.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Sampler

from rlhf_lightning.data.collate import (
    PreferenceCollator,
    PromptCollator,
    SFTCollator,
    tokenize_preference,
    tokenize_prompt,
    tokenize_sft,
)
from rlhf_lightning.data.records import load_examples
from rlhf_lightning.data.samplers import (
    EpochShuffleSampler,
    LengthGroupedSampler,
    RankShare,
    ResumableDataLoader,
    TokenWindowSampler,
    WindowedFeatures,
    example_length,
    scored_tokens,
)
from rlhf_lightning.models import load_tokenizer

log = logging.getLogger(__name__)


def split_examples(examples: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """Seeded random split into ``(train, val)``; each part keeps the original order.

    ``round(len * val_fraction)`` examples (at least one when ``val_fraction > 0``, and
    never all of them) go to validation; ``val_fraction == 0`` gives no validation set.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0 or len(examples) < 2:
        return list(examples), []
    n_val = min(max(1, round(len(examples) * val_fraction)), len(examples) - 1)
    val_idx = set(random.Random(seed).sample(range(len(examples)), n_val))
    train = [ex for i, ex in enumerate(examples) if i not in val_idx]
    return train, [ex for i, ex in enumerate(examples) if i in val_idx]


def _check_sizes(owner: str, **sizes: int | None) -> None:
    """Sizes must be positive integers (None: unset); checked before any model is built."""
    for name, value in sizes.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")


class RLHFDataModule(L.LightningDataModule):
    """Shared machinery: load, validate, split, pre-tokenise, and serve batches.

    Args:
        tokenizer: hub name or local path of the tokenizer (loaded eagerly).
        train_file: training data (see ``records.read_records`` for accepted sources).
        val_file: validation data; when None, ``val_fraction`` of ``train_file`` is held out.
        val_fraction: seeded random fraction held out when ``val_file`` is None (0: none).
        max_prompt_length: prompts longer than this (in tokens) are cut from the left.
        max_response_length: responses (EOS included) longer than this are cut from the right.
        batch_size: training batch size (pairs for preferences, prompts per rollout for PPO).
        val_batch_size: validation batch size (default: ``batch_size``).
        num_workers: DataLoader workers.
        strict: fail on the first bad record (True) or skip and count bad records (False).
        seed: drives the validation split and the training shuffle.
        trust_remote_code: passed to the tokenizer loader.
        train_split: split read from a ``datasets`` dict or hub name for ``train_file``.
        val_split: split read from a ``datasets`` dict or hub name for ``val_file``.
        group_by_length: draw training batches of similar lengths (less padding, so
            faster; still shuffled every epoch, see :class:`LengthGroupedSampler`).
    """

    kind: str = ""  # record kind for records.load_examples: "sft", "preference" or "prompt"
    padding_side: str = "right"
    # Training batches carry ``loss_denominator`` (see TokenWindowSampler): for losses that
    # are a mean over tokens, whose micro-batches hold different numbers of tokens.
    token_weighted: bool = False

    def __init__(
        self,
        tokenizer: str,
        train_file: str,
        val_file: str | None = None,
        val_fraction: float = 0.05,
        max_prompt_length: int = 128,
        max_response_length: int = 128,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        strict: bool = True,
        seed: int = 0,
        trust_remote_code: bool = False,
        train_split: str = "train",
        val_split: str = "test",
        group_by_length: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        _check_sizes(
            type(self).__name__,
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            max_prompt_length=max_prompt_length,
            max_response_length=max_response_length,
        )
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"{type(self).__name__}: val_fraction must be in [0, 1), got {val_fraction}")
        self.truncation: dict[str, dict[str, int]] = {}  # per split: examples and truncation counts
        self.tokenizer = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code, padding_side=self.padding_side)
        self.train_dataset: list[dict[str, Any]] | None = None
        self.val_dataset: list[dict[str, Any]] = []

    # --- what a subclass defines
    def tokenize(self, example: Any) -> dict[str, Any]:
        """Tokenise one example into the feature dict the collator expects."""
        raise NotImplementedError

    def collator(self) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        """The collate function of this module's batches."""
        raise NotImplementedError

    # --- shared machinery
    def _load(self, source: str, split: str) -> list:
        return load_examples(source, self.kind, self.tokenizer, strict=self.hparams.strict, split=split)

    def _tokenize_all(self, examples: list, name: str) -> list[dict[str, Any]]:
        """Tokenise ``examples`` and log how many prompts / responses were truncated."""
        features = [self.tokenize(ex) for ex in examples]
        p_cut = sum(f["prompt_truncated"] for f in features)
        r_cut = sum(f.get("response_truncated", False) for f in features)
        hp = self.hparams
        message = (
            f"{type(self).__name__} {name}: {len(features)} examples; {p_cut} prompts truncated (left) to "
            f"{hp.max_prompt_length} tokens; {r_cut} responses truncated (right) to {hp.max_response_length} tokens"
        )
        self.truncation[name] = {"examples": len(features), "prompts_truncated": p_cut, "responses_truncated": r_cut}
        if features and max(p_cut, r_cut) > 0.1 * len(features):
            rank_zero_warn(message + ": over 10 %, raise max_prompt_length / max_response_length if that is not meant")
        else:
            rank_zero_info(message)
        return features

    def setup(self, stage: str | None = None) -> None:
        """Read, validate, split and tokenise the data (once; later calls do nothing)."""
        if self.train_dataset is not None:
            return
        hp = self.hparams
        train = self._load(hp.train_file, hp.train_split)
        if hp.val_file is not None:
            val = self._load(hp.val_file, hp.val_split)
        else:
            train, val = split_examples(train, hp.val_fraction, hp.seed)
        if not train:
            raise ValueError(f"{hp.train_file}: no usable training records")
        self.val_dataset = self._tokenize_all(val, "val")
        self.train_dataset = self._tokenize_all(train, "train")

    def _loader(self, dataset: list, batch_size: int, shuffle: bool) -> DataLoader:
        hp = self.hparams
        # A loader's own generator: starting a pass never draws from the global RNG, which
        # a resumed run restores and training (dropout, sampling) consumes.
        generator = torch.Generator().manual_seed(hp.seed)
        if not shuffle:
            return DataLoader(
                dataset,
                batch_size=batch_size,
                shuffle=False,
                generator=generator,
                collate_fn=self.collator(),
                num_workers=hp.num_workers,
            )
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        # Each epoch's order is a function of (seed, epoch): a resumed run draws the same one.
        sampler: Sampler = EpochShuffleSampler(len(dataset), hp.seed)
        if hp.get("group_by_length", False):  # PromptDataModule does not offer it
            sampler = LengthGroupedSampler([example_length(f) for f in dataset], batch_size * world, seed=hp.seed)
        if self.token_weighted:
            # The same seeded order, tagged for exact accumulation.
            sampler = TokenWindowSampler(
                sampler,
                [scored_tokens(f) for f in dataset],
                batch_size,
                accumulate=trainer.accumulate_grad_batches if trainer is not None else 1,
                world_size=world,
            )
            dataset = WindowedFeatures(dataset)
        dist = trainer.distributed_sampler_kwargs if trainer is not None else None
        if dist and getattr(trainer._accelerator_connector, "use_distributed_sampler", True):
            sampler = RankShare(sampler, dist["num_replicas"], dist["rank"])  # see RankShare: no reshuffle
        return ResumableDataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            generator=generator,
            collate_fn=self.collator(),
            num_workers=hp.num_workers,
            progress=self._train_progress,
        )

    def _train_progress(self) -> tuple[int, int]:
        """``(epoch, batches of it trained)`` as the Trainer counts them (saved in checkpoints)."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def _require_setup(self) -> list[dict[str, Any]]:
        if self.train_dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a dataloader")
        return self.train_dataset

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches: each epoch's order is a function of ``(seed, epoch)``, and
        checkpoints carry the position in it (:class:`ResumableDataLoader`)."""
        return self._loader(self._require_setup(), self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in file order, or ``[]`` (validation skipped) when there are none."""
        self._require_setup()
        if not self.val_dataset:
            return []
        return self._loader(self.val_dataset, self.hparams.val_batch_size or self.hparams.batch_size, shuffle=False)


class SFTDataModule(RLHFDataModule):
    """SFT batches: ``input_ids``, ``attention_mask``, ``labels``, each ``(B, T)`` right-padded.

    Training batches also carry ``loss_denominator`` (a float tensor): dividing a
    micro-batch's summed token loss by it makes ``accumulate_grad_batches`` and DDP give
    exactly the gradient of the token mean over all micro-batches of an optimizer step
    (:class:`TokenWindowSampler`). It is read from the Trainer when the loader is built, so
    a schedule that changes ``accumulate_grad_batches`` mid-run needs
    ``reload_dataloaders_every_n_epochs=1``.
    """

    kind = "sft"
    token_weighted = True

    def tokenize(self, example: Any) -> dict[str, Any]:
        hp = self.hparams
        return tokenize_sft(example, self.tokenizer, hp.max_prompt_length, hp.max_response_length)

    def collator(self) -> SFTCollator:
        return SFTCollator(self.tokenizer.pad_token_id)


class PreferenceDataModule(RLHFDataModule):
    """Preference batches for reward modelling and DPO: ``input_ids``, ``attention_mask``,
    ``labels`` ``(2B, T)`` (rows ``0..B-1`` chosen, ``B..2B-1`` rejected), ``num_pairs``,
    ``index`` ``(B,)`` (each pair's position in its split), and ``margin`` ``(B,)`` when
    the data has margins."""

    kind = "preference"

    def _tokenize_all(self, examples: list, name: str) -> list[dict[str, Any]]:
        features = super()._tokenize_all(examples, name)
        same = [i for i, f in enumerate(features) if f["chosen_input_ids"] == f["rejected_input_ids"]]
        if same:
            hp = self.hparams
            source = hp.train_file if name == "train" else hp.val_file or hp.train_file
            first = examples[same[0]].prompt[:60]
            problem = (
                f"{len(same)} {name} pair(s) of {source} have identical chosen and rejected after truncation to "
                f"max_response_length={hp.max_response_length} (first: pair {same[0]} of the split, prompt {first!r})"
            )
            if hp.strict:
                raise ValueError(problem + "; raise max_response_length, or set strict=false to skip them")
            rank_zero_warn(problem + ": skipped")
            drop = set(same)
            features = [f for i, f in enumerate(features) if i not in drop]
            self.truncation[name]["identical_pairs_skipped"] = len(same)
        for i, f in enumerate(features):
            f["index"] = i  # lets DPO cache per-pair reference log-probs (precompute_ref_logps)
        return features

    def tokenize(self, example: Any) -> dict[str, Any]:
        hp = self.hparams
        return tokenize_preference(example, self.tokenizer, hp.max_prompt_length, hp.max_response_length)

    def collator(self) -> PreferenceCollator:
        return PreferenceCollator(self.tokenizer.pad_token_id)


class PromptDataModule(RLHFDataModule):
    """Prompt batches for PPO rollouts and generation: ``input_ids``, ``attention_mask``
    ``(B, Q)`` left-padded, and ``prompts`` (the raw texts).

    A training batch is one rollout batch of ``batch_size`` prompts; ``max_response_length``
    is the generation budget (new tokens per response). ``eval_file`` holds prompts for
    generation-based evaluation: served by :meth:`eval_dataloader`, and used as the
    validation set when given. :meth:`predict_dataloader` serves the held-out prompts
    (``eval_file``, else the validation prompts, else the training prompts).
    """

    kind = "prompt"
    padding_side = "left"

    def __init__(
        self,
        tokenizer: str,
        train_file: str,
        val_file: str | None = None,
        val_fraction: float = 0.05,
        max_prompt_length: int = 128,
        max_response_length: int = 64,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        strict: bool = True,
        seed: int = 0,
        trust_remote_code: bool = False,
        train_split: str = "train",
        val_split: str = "test",
        eval_file: str | None = None,
    ):
        super().__init__(
            tokenizer,
            train_file,
            val_file,
            val_fraction,
            max_prompt_length,
            max_response_length,
            batch_size,
            val_batch_size,
            num_workers,
            strict,
            seed,
            trust_remote_code,
            train_split,
            val_split,
        )
        self.eval_dataset: list[dict[str, Any]] = []

    def tokenize(self, example: Any) -> dict[str, Any]:
        return tokenize_prompt(example, self.tokenizer, self.hparams.max_prompt_length)

    def collator(self) -> PromptCollator:
        return PromptCollator(self.tokenizer.pad_token_id)

    def setup(self, stage: str | None = None) -> None:
        """As the base class, plus the held-out ``eval_file`` prompts when given."""
        if self.train_dataset is not None:
            return
        if self.hparams.eval_file is not None:
            self.eval_dataset = self._tokenize_all(self._load(self.hparams.eval_file, self.hparams.val_split), "eval")
        super().setup(stage)

    def _eval_batches(self, dataset: list[dict[str, Any]]) -> DataLoader:
        return self._loader(dataset, self.hparams.val_batch_size or self.hparams.batch_size, shuffle=False)

    def eval_dataloader(self) -> DataLoader | None:
        """Held-out ``eval_file`` prompts in file order, or None without an ``eval_file``."""
        self._require_setup()
        return self._eval_batches(self.eval_dataset) if self.eval_dataset else None

    def val_dataloader(self) -> DataLoader | list:
        """The ``eval_file`` prompts when given, else the validation prompts (or ``[]``)."""
        loader = self.eval_dataloader()
        return loader if loader is not None else super().val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """Prompts for ``rlhf-lightning predict``: ``eval_file``, else validation, else training prompts."""
        train = self._require_setup()
        return self._eval_batches(self.eval_dataset or self.val_dataset or train)
