"""Evaluation: pure metrics, sampling-and-scoring of policies, the ``evaluate`` command, the training callback.

* :mod:`~rlhf_lightning.eval.metrics`: pure functions of per-sample records, and the
  one list of metric columns every table shows;
* :mod:`~rlhf_lightning.eval.sampling`: :func:`sample_and_score`, one record per prompt;
* :mod:`~rlhf_lightning.eval.evaluate`: :func:`evaluate_policies` and the
  ``rlhf-lightning evaluate`` command (``evaluate.main``);
* :mod:`~rlhf_lightning.eval.callback`: :class:`GoldRewardEval` for any policy system;
* :mod:`~rlhf_lightning.eval.frontier`: pure functions of the reward–KL frontier (best-of-n
  estimator and KL, Gao et al.'s fits, mean ± s.e.);
* :mod:`~rlhf_lightning.eval.best_of_n`: ``best_of_n.best_of_n`` and the ``rlhf-lightning
  best-of-n`` command (``best_of_n.main``); the function is not re-exported here, so
  ``rlhf_lightning.eval.best_of_n`` stays the module.
"""

from rlhf_lightning.eval.callback import GoldRewardEval
from rlhf_lightning.eval.evaluate import evaluate_policies, format_table
from rlhf_lightning.eval.frontier import best_of_n_estimate, bon_kl, fit_bon, fit_rl, mean_se
from rlhf_lightning.eval.metrics import (
    METRIC_COLUMNS,
    MetricColumn,
    aggregate_metrics,
    distinct_n,
    metric_columns,
    summarize,
    training_eval_metrics,
    win_rate,
)
from rlhf_lightning.eval.sampling import sample_and_score

__all__ = [
    "METRIC_COLUMNS",
    "GoldRewardEval",
    "MetricColumn",
    "aggregate_metrics",
    "best_of_n_estimate",
    "bon_kl",
    "distinct_n",
    "evaluate_policies",
    "fit_bon",
    "fit_rl",
    "format_table",
    "mean_se",
    "metric_columns",
    "sample_and_score",
    "summarize",
    "training_eval_metrics",
    "win_rate",
]
