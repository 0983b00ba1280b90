"""A markdown report of a run: training curves, reward vs KL, reward-model accuracy, samples, timings.

``python -m rlhf_lightning.report RUN_DIR`` reads what the stages left in ``RUN_DIR``:

* ``<stage>/logs/metrics.csv`` of every stage directory that has one (Lightning's
  ``CSVLogger``; ``logs/version_*/metrics.csv`` too), so new stages need no code here;
* ``eval.json`` and ``eval_samples.jsonl`` (``rlhf-lightning evaluate``; also looked for in ``eval/``),
* ``data/summary.json`` (the demo task's preference noise ceiling), ``pipeline_state.json``
  (stage order and wall times),

and writes ``RUN_DIR/report.md`` with PNG figures in ``RUN_DIR/figures/``. Anything
missing (a stage, a column, a file) is skipped, never an error.

* :mod:`~rlhf_lightning.report.io`: reading metrics CSVs, ``eval.json``, samples; stage discovery;
* :mod:`~rlhf_lightning.report.figures`: the figures (``matplotlib.figure.Figure``, Agg);
* :mod:`~rlhf_lightning.report.markdown`: :func:`write_report`;
* :mod:`~rlhf_lightning.report.summary`: :func:`summary_lines`, the terminal summary;
* :mod:`~rlhf_lightning.report.frontier`: :func:`write_frontier_report`, ``frontier.md`` of a
  sweep directory (figures in :mod:`~rlhf_lightning.report.frontier_figures`).

The metric columns of the tables are :data:`rlhf_lightning.eval.metrics.METRIC_COLUMNS`.
"""

from rlhf_lightning.report.figures import (
    PANELS,
    eval_trajectory,
    plot_frontier,
    plot_overoptimization,
    plot_rm_accuracy,
    plot_training_curves,
)
from rlhf_lightning.report.frontier import write_frontier_report
from rlhf_lightning.report.io import discover_stages, find_metrics_csv, read_metrics_csv
from rlhf_lightning.report.markdown import metrics_table, write_report
from rlhf_lightning.report.summary import summary_lines

__all__ = [
    "PANELS",
    "discover_stages",
    "eval_trajectory",
    "find_metrics_csv",
    "metrics_table",
    "plot_frontier",
    "plot_overoptimization",
    "plot_rm_accuracy",
    "plot_training_curves",
    "read_metrics_csv",
    "summary_lines",
    "write_frontier_report",
    "write_report",
]
