"""Summary statistics for per-image scores: standard errors, paired comparisons, bootstrap intervals.

Every table cell can show ``mean ± SE`` (:func:`summarize`); every "EPD vs baseline" comparison on the same seeds
and prompts uses the paired difference (:func:`paired_diff`), whose standard error is far smaller than the two
unpaired ones when per-image scores are correlated.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

__all__ = ["summarize", "paired_diff", "bootstrap_ci", "se_from_population_std"]


def _as_1d(x, name="x") -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name}: no values")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: contains NaN or inf at positions {np.flatnonzero(~np.isfinite(a))[:5].tolist()}")
    return a


def summarize(x) -> dict:
    """Mean, population std (the original result files' ``std``), standard error of the mean and count.

    Args:
        x: 1-D array-like of per-image scores.

    Returns:
        `dict`: ``mean``, ``std`` (population, ddof=0), ``se`` (sample std / sqrt(n); NaN for n = 1), ``n``,
        ``min``, ``max``.
    """
    a = _as_1d(x)
    n = a.size
    return {"mean": float(a.mean()), "std": float(a.std(ddof=0)),
            "se": float(a.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
            "n": int(n), "min": float(a.min()), "max": float(a.max())}


def se_from_population_std(std: float, n: int) -> float:
    """Standard error of the mean from a population std (``ddof=0``) and count: ``std / sqrt(n - 1)``."""
    return float(std) / math.sqrt(n - 1) if n > 1 else float("nan")


def paired_diff(a, b) -> dict:
    """Paired comparison ``a - b`` on the same items (same seeds and prompts), with a paired t-test.

    Args:
        a, b: 1-D array-likes of equal length (e.g. EPD and baseline per-image scores, aligned).

    Returns:
        `dict`: ``diff`` (mean of a - b), ``se`` (its standard error), ``t``, ``p`` (two-sided paired t-test; 1.0
        when all differences are zero, NaN for n = 1), ``n``.
    """
    from scipy import stats

    a, b = _as_1d(a, "a"), _as_1d(b, "b")
    if a.size != b.size:
        raise ValueError(f"paired_diff: a has {a.size} values, b has {b.size}; pair them by image first")
    d = a - b
    n = d.size
    if n < 2:
        return {"diff": float(d.mean()), "se": float("nan"), "t": float("nan"), "p": float("nan"), "n": n}
    se = float(d.std(ddof=1) / math.sqrt(n))
    if se == 0.0:
        return {"diff": float(d.mean()), "se": 0.0, "t": 0.0 if d.mean() == 0 else math.copysign(math.inf, d.mean()),
                "p": 1.0 if d.mean() == 0 else 0.0, "n": n}
    res = stats.ttest_rel(a, b)
    return {"diff": float(d.mean()), "se": se, "t": float(res.statistic), "p": float(res.pvalue), "n": n}


def bootstrap_ci(x, stat: Callable = np.mean, n: int = 10_000, seed: int = 0, level: float = 0.95,
                 paired_with=None) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``stat`` (resampling items with replacement).

    Args:
        x: 1-D array-like.
        stat (`Callable`): statistic of a 1-D array (applied along the last axis of a (n_boot, N) array when it
            accepts ``axis``; otherwise row by row).
        n (`int`): bootstrap resamples.
        seed (`int`): RNG seed (same seed -> same interval).
        level (`float`): confidence level.
        paired_with: optional second array; the interval is then for ``stat(x - paired_with)`` resampled jointly.

    Returns:
        `(lo, hi)`.
    """
    a = _as_1d(x)
    if paired_with is not None:
        b = _as_1d(paired_with, "paired_with")
        if b.size != a.size:
            raise ValueError("bootstrap_ci: paired arrays differ in length")
        a = a - b
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(int(n), a.size))
    samples = a[idx]
    try:
        vals = np.asarray(stat(samples, axis=-1), dtype=np.float64)
        if vals.shape != (int(n),):
            raise TypeError
    except TypeError:
        vals = np.array([stat(s) for s in samples], dtype=np.float64)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(vals, [alpha, 1 - alpha])
    return float(lo), float(hi)
