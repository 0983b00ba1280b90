"""The ``rlhf-lightning`` command: one explicit table of subcommands.

* ``fit``, ``validate``, ``test``, ``predict``: LightningCLI runs of a stage config
  (``trainer_cli.py``);
* ``demo-data --out DIR``: write the bundled demo task (data, tokenizer, summary);
* ``pipeline -c configs/quickstart.yaml``: every stage end to end;
* ``sweep -c configs/frontier.yaml``: a grid of settings x seeds of stages, and the frontier report;
* ``evaluate``: sample from several policies and compare them;
* ``best-of-n``: best-of-n curves of a policy under the proxy reward model, scored by the gold reward;
* ``cai-revise``: SL-CAI data (critique -> revision of policy samples under a constitution);
* ``cai-label``: AI-feedback preference pairs with soft labels.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from rlhf_lightning import pipeline
from rlhf_lightning.cai import commands as cai
from rlhf_lightning.data import demo
from rlhf_lightning.eval import best_of_n, evaluate
from rlhf_lightning.pipeline import sweep
from rlhf_lightning.trainer_cli import quiet_known_false_alarms, run_lightning_cli

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
COMMANDS: dict[str, Callable[[list[str]], Any]] = {
    "demo-data": demo.main,
    "pipeline": pipeline.main,
    "sweep": sweep.main,
    "evaluate": evaluate.main,
    "best-of-n": best_of_n.main,
    "cai-revise": cai.revise_main,
    "cai-label": cai.label_main,
}


def cli_main(args: list[str] | None = None):
    """Entry point of ``rlhf-lightning``; callable from Python and tests with a list of arguments.

    Returns the LightningCLI object (Lightning subcommands) or the command's result.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_known_false_alarms()
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    return run_lightning_cli(argv)


def main() -> None:
    """The ``rlhf-lightning`` console script: exit status 0 on success.

    (``cli_main`` returns the CLI object or a command's result for Python callers; a
    console script returning it would make ``sys.exit`` print it and exit with status 1.)
    """
    cli_main()


if __name__ == "__main__":
    main()
