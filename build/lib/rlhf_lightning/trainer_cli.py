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

import jsonargparse
import lightning as L
from lightning.pytorch.cli import LightningCLI

# Interpolations such as ${inputs.sft} are written relative to the subcommand's config
# (``fit``'s keys), not to the root parser's.
jsonargparse.set_parsing_settings(omegaconf_absolute_to_relative_paths=True)


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


def run_lightning_cli(args: list[str] | None = None, run: bool = True) -> RLHFCLI:
    """Run ``fit``/``validate``/``test``/``predict`` with ``args`` (``sys.argv`` when None)."""
    return RLHFCLI(
        model_class=L.LightningModule,
        datamodule_class=L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf+"},
        args=args,
        run=run,
    )
