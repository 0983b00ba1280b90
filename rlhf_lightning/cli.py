"""The ``rlhf-lightning`` command.

``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI subcommands: the system
(``model``) and the DataModule (``data``) are chosen by ``class_path`` in YAML, every
``__init__`` argument is a flag, and ``--print_config`` prints a config that round-trips.
The tokenizer is given once, under ``data``, and linked into the model.

Other subcommands, outside the Trainer:

* ``demo-data --out DIR``: write the bundled demo task (data, tokenizer, summary);
* ``pipeline -c configs/quickstart.yaml``: every stage end to end;
* ``evaluate``: sample from several policies and compare them.
"""

from __future__ import annotations

import os
import sys

import lightning as L
from lightning.pytorch.cli import LightningCLI


class RLHFCLI(LightningCLI):
    """LightningCLI with the links shared by every stage."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.init_args.tokenizer", "model.init_args.tokenizer", apply_on="parse")


def _lightning_main(args: list[str] | None, run: bool = True) -> RLHFCLI:
    return RLHFCLI(
        model_class=L.LightningModule,
        datamodule_class=L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "yaml"},
        args=args,
        run=run,
    )


EXTRA_COMMANDS = {
    "demo-data": "rlhf_lightning.data.demo:main",
    "pipeline": "rlhf_lightning.pipeline:main",
    "evaluate": "rlhf_lightning.evaluation:main",
}


def cli_main(args: list[str] | None = None):
    """Entry point of ``rlhf-lightning``; callable from Python and tests with a list of arguments."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in EXTRA_COMMANDS:
        module_name, func = EXTRA_COMMANDS[argv[0]].split(":")
        module = __import__(module_name, fromlist=[func])
        return getattr(module, func)(argv[1:])
    return _lightning_main(argv)


def main() -> None:
    """The ``rlhf-lightning`` console script: exit status 0 on success.

    (``cli_main`` returns the CLI object or a command's result for Python callers; a
    console script returning it would make ``sys.exit`` print it and exit with status 1.)
    """
    cli_main()


if __name__ == "__main__":
    main()
