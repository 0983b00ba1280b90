"""The Lightning side of the command line: ``fit``, ``validate``, ``test`` and ``predict``.

The system (``model``) and the DataModule (``data``) are chosen by ``class_path`` in YAML,
every ``__init__`` argument is a flag, and ``--print_config`` prints a config that
round-trips. The tokenizer is given once, under ``data``, and linked into the model.

Stage configs declare what they read in a top-level ``inputs`` block (exports of earlier
stages, data files, the tokenizer, a gold reward) and refer to it, and to
``trainer.default_root_dir`` for everything they write, with interpolations such as
``${inputs.sft}`` or ``${trainer.default_root_dir}/checkpoints``. They are resolved after
the command line is merged, so ``--inputs.sft=runs/x/sft/hf`` or
``--trainer.default_root_dir=runs/x/ppo`` moves every path that depends on them. The
pipeline wires stages by setting exactly these keys.
"""

from __future__ import annotations

import logging
import sys
import warnings

import jsonargparse
import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from transformers.utils import logging as hf_logging

from rlhf_lightning.callbacks import NonFiniteGuard
from rlhf_lightning.resume import continue_wandb_runs, finish_wandb_runs
from rlhf_lightning.rundir import RunDirLock, is_launcher_child

# Interpolations such as ${inputs.sft} are written relative to the subcommand's config
# (``fit``'s keys), not to the root parser's.
jsonargparse.set_parsing_settings(omegaconf_absolute_to_relative_paths=True)


class ConciseParser(LightningArgumentParser):
    """A configuration error shows the offending key and value and one usage line, not the
    ~50-line usage of every option (that stays on ``--help``)."""

    def print_usage(self, file=None) -> None:
        prog = self.prog.replace(" [options]", "")
        (file or sys.stderr).write(f"usage: {prog} -c CONFIG.yaml [--KEY=VALUE ...]\n")


class RLHFCLI(LightningCLI):
    """LightningCLI with the ``inputs`` block and the links shared by every stage."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--inputs",
            type=dict[str, str | None],
            default={},
            help="what the stage reads (exports, data files, tokenizer, gold reward), referred to as ${inputs.NAME}",
        )
        parser.link_arguments("data.init_args.tokenizer", "model.init_args.tokenizer", apply_on="parse")
        # Always on: a non-finite loss or gradient stops the run (or, --nonfinite.action=skip, skips the step).
        parser.add_lightning_class_args(NonFiniteGuard, "nonfinite")

    def instantiate_classes(self) -> None:
        # A training run resumed from a checkpoint logs on to the W&B run it started (resume.py).
        # The id goes to the loggers only: the config saved with the run keeps the user's.
        sub = self.config.get("fit") if self.subcommand == "fit" else None
        given = continue_wandb_runs(sub.trainer, sub.ckpt_path) if sub is not None and sub.get("ckpt_path") else []
        try:
            super().instantiate_classes()
        finally:
            for init_args in given:
                init_args["id"] = None

    def before_fit(self) -> None:
        # One run per directory (rundir.py); the DDP launcher's other ranks share rank 0's lock.
        if not is_launcher_child():
            self._run_lock = RunDirLock(self.trainer.default_root_dir).acquire()

    def after_fit(self) -> None:
        # Each stage is a W&B run of its own: without this, the next stage run in this process
        # (pipeline, sweep) would log into the same one.
        try:
            finish_wandb_runs(self.trainer)
        finally:
            lock = getattr(self, "_run_lock", None)
            if lock is not None:
                lock.release()

    def parse_arguments(self, parser, args) -> None:
        # LightningCLI's own, minus its warning about ``args`` *and* ``sys.argv``: ``cli_main``
        # always passes the whole command line, and under the pipeline or pytest ``sys.argv``
        # belongs to the outer program.
        self.config = parser.parse_args(args)


def _not_a_tip(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("💡 Tip:")


def quiet_known_false_alarms() -> None:
    """Silence third-party messages that are advertisements or false alarms for this package.

    Each filter matches one exact message and says why it is safe; anything else still shows.
    """
    # Lightning advertises its cloud products in every fit; no flag turns the tips off.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_a_tip)
    # The frozen reference and reward models are in eval mode by design (systems/base.py).
    warnings.filterwarnings(
        "ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training", category=PossibleUserWarning
    )
    # Online-RL systems evaluate by generation (GoldRewardEval), not with validation_step.
    warnings.filterwarnings(
        "ignore", message=r"You passed in a `val_dataloader` but have no `validation_step`", category=UserWarning
    )
    # With manual optimisation the checkpoint after the optimizer step is the one to resume from.
    warnings.filterwarnings(
        "ignore",
        message=r"Using ModelCheckpoint with manual optimization and every_n_train_steps",
        category=UserWarning,
    )
    # Lightning 2.6 calls torch's deprecated LeafSpec check; harmless until torch removes it.
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
    # One progress bar per from_pretrained/save_pretrained of these small exports is noise.
    hf_logging.disable_progress_bar()


def run_lightning_cli(args: list[str] | None = None, run: bool = True) -> RLHFCLI:
    """Run ``fit``/``validate``/``test``/``predict`` with ``args`` (``sys.argv`` when None)."""
    try:
        return RLHFCLI(
            model_class=L.LightningModule,
            datamodule_class=L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_class=ConciseParser,
            parser_kwargs={"parser_mode": "omegaconf+"},
            args=args,
            run=run,
        )
    except BaseException:
        # A failed stage's W&B run ends here, marked failed, so that a next stage or sweep point
        # run in this process starts its own instead of logging into it.
        wandb = sys.modules.get("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None:
            wandb.finish(exit_code=1)
        raise


class _ParseOnly(RLHFCLI):
    """Parses and validates a config (types, unknown keys, interpolations); builds and runs nothing.

    Built with ``run=False`` (no subcommand is run) and ``auto_configure_optimizers=False``; the two
    overrides below keep the remaining steps of ``LightningCLI.__init__`` from acting."""

    def _set_seed(self) -> None:
        """Validation must not reseed the caller's global RNG (nor set ``PL_GLOBAL_SEED``)."""

    def instantiate_classes(self) -> None:
        """Nothing is built: the models a config names may not exist yet."""


def parse_only(config: dict) -> dict:
    """Validate a stage config as ``rlhf-lightning fit -c`` would, without building anything.

    Returns the parsed config as a dict; a bad key or value exits (``SystemExit``) after the
    parser has printed what is wrong, as the command line does.
    """
    import tempfile

    import yaml

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(config, f, sort_keys=False)
        f.flush()
        cli = _ParseOnly(
            model_class=L.LightningModule,
            datamodule_class=L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_class=ConciseParser,
            parser_kwargs={"parser_mode": "omegaconf+"},
            auto_configure_optimizers=False,
            args=["-c", f.name],
            run=False,
        )
    return cli.config.as_dict()
