"""Statistics helpers against closed forms and scipy."""

import math

import numpy as np
import pytest
from scipy import stats

from epd.metrics.stats import bootstrap_ci, paired_diff, se_from_population_std, summarize


def test_summarize_closed_form():
    x = [1.0, 2.0, 3.0, 4.0]
    s = summarize(x)
    assert s["mean"] == 2.5 and s["n"] == 4 and s["min"] == 1.0 and s["max"] == 4.0
    assert s["std"] == pytest.approx(math.sqrt(1.25))            # population std, as the original files
    assert s["se"] == pytest.approx(math.sqrt(5 / 3) / 2)          # sample std / sqrt(n)
    assert se_from_population_std(s["std"], 4) == pytest.approx(s["se"])
    assert math.isnan(summarize([3.0])["se"])
    with pytest.raises(ValueError, match="NaN"):
        summarize([1.0, float("nan")])
    with pytest.raises(ValueError, match="no values"):
        summarize([])


def test_paired_diff_matches_scipy_and_beats_unpaired():
    rng = np.random.default_rng(0)
    base = rng.normal(0.25, 0.04, 500)                    # per-image HPS-like spread
    epd = base + 0.002 + rng.normal(0, 0.004, 500)        # small, consistent improvement
    r = paired_diff(epd, base)
    ref = stats.ttest_rel(epd, base)
    assert r["t"] == pytest.approx(ref.statistic) and r["p"] == pytest.approx(ref.pvalue)
    assert r["diff"] == pytest.approx(np.mean(epd - base))
    assert r["se"] == pytest.approx(np.std(epd - base, ddof=1) / math.sqrt(500))
    unpaired_se = math.hypot(summarize(epd)["se"], summarize(base)["se"])
    assert r["se"] < unpaired_se / 5 and r["p"] < 1e-6
    same = paired_diff(base, base)
    assert same["diff"] == 0 and same["p"] == 1.0
    with pytest.raises(ValueError, match="pair them"):
        paired_diff([1, 2, 3], [1, 2])


def test_bootstrap_ci_is_seeded_and_covers_normal_interval():
    rng = np.random.default_rng(1)
    x = rng.normal(5.0, 1.0, 400)
    lo, hi = bootstrap_ci(x, n=4000, seed=3)
    assert (lo, hi) == bootstrap_ci(x, n=4000, seed=3)
    se = np.std(x, ddof=1) / 20
    assert lo == pytest.approx(x.mean() - 1.96 * se, abs=0.3 * se)
    assert hi == pytest.approx(x.mean() + 1.96 * se, abs=0.3 * se)
    # a statistic without an axis argument works too (row by row)
    lo2, hi2 = bootstrap_ci(x, stat=lambda a: float(np.median(a)), n=300, seed=0)
    assert lo2 < np.median(x) < hi2
    # paired version equals bootstrapping the differences
    y = x + rng.normal(0.1, 0.1, 400)
    assert bootstrap_ci(y, paired_with=x, n=500, seed=2) == bootstrap_ci(y - x, n=500, seed=2)
