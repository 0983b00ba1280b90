"""Pure functions of the reward–KL frontier: best-of-n, Gao et al.'s functional forms, mean ± s.e.

Gao, Schulman & Hilton (2022), "Scaling Laws for Reward Model Overoptimization", describe
the gold reward of an optimised policy as a function of its distance from the initial
policy, ``d = sqrt(KL(pi || pi_init))``:

* best-of-n: ``r(d) = d (alpha - beta d)``;
* RL:        ``r(d) = d (alpha - beta ln d)``;

where ``r`` is the gold reward *minus the initial (reference, SFT) policy's gold reward*,
so both forms pass through ``r(0) = 0``. Each form is linear in ``(alpha, beta)``, so
:func:`fit_bon` and :func:`fit_rl` are least squares without an intercept. Nothing here
touches a model; every function is checked by hand in ``tests/test_frontier.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

# ----------------------------------------------------------------------------- best-of-n


def bon_kl(n: int) -> float:
    """``log n - (n - 1) / n``: the KL (nats) of the best-of-``n`` policy from the policy sampled.

    Exact when the proxy scores of samples never tie (a continuous score), an upper bound
    otherwise (Stiennon et al. 2020, appendix; Beirami et al. 2024). ``bon_kl(1) = 0``.
    """
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    return math.log(n) - (n - 1) / n


def best_of_n_weights(n_samples: int, n: int) -> list[float]:
    """Probability that the sample of 0-based ascending proxy rank ``i`` is the best of a random ``n``-subset.

    Among ``N = n_samples`` samples sorted by proxy ascending, the sample at 1-based rank
    ``i`` is the maximum of a uniformly random ``n``-subset exactly when the subset holds it
    and ``n - 1`` of the ``i - 1`` samples below it: ``C(i - 1, n - 1) / C(N, n)``. The
    weights sum to 1 (the hockey-stick identity); ranks below ``n`` get 0.
    """
    if not 1 <= n <= n_samples:
        raise ValueError(f"best-of-{n} needs 1 <= n <= the number of samples ({n_samples})")
    total = math.comb(n_samples, n)
    return [math.comb(i, n - 1) / total for i in range(n_samples)]  # exact integers, one rounding


def best_of_n_estimate(proxy: Sequence[float], gold: Sequence[float], n: int) -> tuple[float, float]:
    """Expected ``(gold, proxy)`` reward of the sample the proxy picks among ``n`` of one prompt's samples.

    The unbiased estimator without resampling: with ``N >= n`` samples of one prompt,
    average over *all* ``C(N, n)`` subsets of size ``n`` the gold and proxy reward of the
    subset's proxy-best sample, computed in ``O(N log N)`` with :func:`best_of_n_weights`.
    ``n = 1`` gives the plain means; ``n = N`` the proxy-best sample.

    Ties: samples are ranked by ``(proxy, position in the input)``, so of two samples with
    equal proxy scores the one given *later* counts as the larger. The result is then
    deterministic; as the samples are i.i.d. their order is random, so this is the same in
    expectation as breaking ties at random.
    """
    if len(proxy) != len(gold):
        raise ValueError(f"{len(proxy)} proxy scores but {len(gold)} gold scores")
    order = sorted(range(len(proxy)), key=lambda i: (proxy[i], i))  # ascending proxy, later wins ties
    weights = best_of_n_weights(len(proxy), n)
    g = sum(w * gold[i] for w, i in zip(weights, order, strict=True))
    p = sum(w * proxy[i] for w, i in zip(weights, order, strict=True))
    return float(g), float(p)


# ----------------------------------------------------------------------------- Gao et al.'s forms


def bon_form(d, alpha: float, beta: float):
    """Gao et al.'s best-of-n form ``d (alpha - beta d)`` (a float or an array ``d``)."""
    d = np.asarray(d, dtype=float)
    return d * (alpha - beta * d)


def _d_log_d(d: np.ndarray) -> np.ndarray:
    """``d ln d``, with its limit 0 at ``d = 0``."""
    return np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)


def rl_form(d, alpha: float, beta: float):
    """Gao et al.'s RL form ``d (alpha - beta ln d)`` (0 at ``d = 0``; a float or an array ``d``)."""
    d = np.asarray(d, dtype=float)
    return alpha * d - beta * _d_log_d(d)


def _fit(d, r, form: str, second: Callable[[np.ndarray], np.ndarray]) -> tuple[float, float]:
    """Least squares of ``r ~ alpha d - beta second(d)`` without an intercept."""
    d = np.asarray(d, dtype=float)
    r = np.asarray(r, dtype=float)
    if d.ndim != 1 or d.shape != r.shape:
        raise ValueError(f"fitting the {form} form: d and r must be 1-d and of one length, got {d.shape} and {r.shape}")
    if len(d) < 2:
        raise ValueError(f"fitting the {form} form needs at least 2 points (d, r), got {len(d)}")
    if not (np.isfinite(d).all() and np.isfinite(r).all()) or (d < 0).any():
        raise ValueError(f"fitting the {form} form: d must be finite and >= 0 and r finite, got d={d} r={r}")
    x = np.stack([d, -second(d)], axis=1)  # (P, 2)
    if np.linalg.matrix_rank(x) < 2:
        raise ValueError(
            f"fitting the {form} form: the points do not determine alpha and beta "
            f"(need at least 2 distinct d > 0{' other than d = 1' if form == 'RL' else ''}), got d={d}"
        )
    (alpha, beta), *_ = np.linalg.lstsq(x, r, rcond=None)
    return float(alpha), float(beta)


def fit_bon(d, r) -> tuple[float, float]:
    """``(alpha, beta)`` of ``r = d (alpha - beta d)`` by least squares (no intercept).

    Args:
        d: ``sqrt(KL)`` of each point (nats^0.5, >= 0).
        r: gold reward of each point minus the initial policy's gold reward.

    Raises ``ValueError`` with fewer than 2 points, or points that do not determine both
    parameters (fewer than 2 distinct ``d > 0``).
    """
    return _fit(d, r, "best-of-n", lambda x: x * x)


def fit_rl(d, r) -> tuple[float, float]:
    """``(alpha, beta)`` of ``r = d (alpha - beta ln d)`` by least squares (no intercept).

    ``d`` and ``r`` as in :func:`fit_bon`. A point at ``d = 0`` fits exactly and carries no
    information; a point at ``d = 1`` constrains ``alpha`` alone (``ln 1 = 0``).
    """
    return _fit(d, r, "RL", _d_log_d)


def fit_rmse(d, r, form: Callable, alpha: float, beta: float) -> float:
    """Root mean square of ``r - form(d, alpha, beta)`` (``form``: :func:`bon_form` or :func:`rl_form`)."""
    resid = np.asarray(r, dtype=float) - form(d, alpha, beta)
    return float(np.sqrt(np.mean(resid**2)))


def peak_d(form: Callable, alpha: float, beta: float) -> float | None:
    """The ``d`` at which the fitted gold reward peaks, or None when it rises for ever (``beta <= 0``).

    Best-of-n: ``d* = alpha / (2 beta)``; RL: ``alpha - beta ln d - beta = 0`` gives
    ``d* = exp(alpha / beta - 1)``.
    """
    if beta <= 0:
        return None
    if form is bon_form:
        return max(alpha / (2 * beta), 0.0)
    if form is rl_form:
        return math.exp(min(alpha / beta - 1, 700.0))
    raise ValueError(f"unknown form {form!r}")


# ----------------------------------------------------------------------------- statistics


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, standard error of the mean)``: s.e. = sample std (ddof 1) / sqrt(n).

    One value has no spread to estimate: its s.e. is ``nan`` (shown as "–" in tables,
    drawn without an error bar). No values raise ``ValueError``.
    """
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_se of no values")
    n = len(xs)
    mean = sum(xs) / n
    if n == 1:
        return mean, math.nan
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, math.sqrt(var / n)
