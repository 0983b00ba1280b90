"""``python -m rlhf_lightning.report RUN_DIR [--stage NAME=DIR ...]``: write ``RUN_DIR/report.md``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rlhf_lightning.report.markdown import write_report


def main(argv: list[str] | None = None) -> Path:
    """Parse the arguments, write the report, print its path."""
    p = argparse.ArgumentParser(
        prog="python -m rlhf_lightning.report",
        description="A markdown report of a run: curves, reward vs KL, RM accuracy, samples.",
    )
    p.add_argument("run_dir")
    p.add_argument(
        "--stage",
        action="append",
        default=None,
        metavar="NAME=DIR",
        help="a stage and its directory (repeat); default: every sub-directory with logs/metrics.csv",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stages = dict(s.split("=", 1) for s in args.stage) if args.stage else None
    out = write_report(args.run_dir, stages)
    print(out)
    return out


if __name__ == "__main__":
    main()
