"""The compute-matched view (epd.report.compute_matched) against answers worked out by hand.

Rows: EPD at 5 forward passes; baselines at 3, 5 and 7 forward passes. The EPD row is paired with the best row at
no more than 5 forward passes (not the better one at 7), and the difference and its SE are the paired ones
(mean and sample standard deviation / sqrt(n) of the per-seed differences).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from epd.report.compute_matched import best_by_nfe, compute_matched, markdown

SEEDS = list(range(10))
RNG = np.random.default_rng(0)


def _item(solver, nfe, fwd, values):
    return {"solver": solver, "nfe": nfe, "forward_passes": fwd, "mean": float(np.mean(values)),
            "values": dict(zip(SEEDS, values))}


EPD = RNG.uniform(0.1, 0.2, 10)
CHEAP = EPD + RNG.uniform(0.05, 0.1, 10)       # 3 forward passes, worse
MATCHED = EPD + RNG.uniform(-0.02, 0.04, 10)   # 5 forward passes: the best within budget
COSTLY = EPD - 0.05                            # 7 forward passes: better, but over budget
ITEMS = [_item("epd_distilled", 3, 5, EPD), _item("dpmpp_2m", 3, 3, CHEAP), _item("ipndm", 5, 5, MATCHED),
         _item("ipndm", 7, 7, COSTLY)]


def test_epd_is_paired_with_the_best_row_within_its_forward_passes():
    (rec,) = compute_matched(ITEMS, "rmse")
    assert (rec["vs"], rec["vs_nfe"], rec["vs_forward_passes"]) == ("ipndm", 5, 5)
    d = EPD - MATCHED
    assert rec["diff"] == pytest.approx(d.mean(), rel=1e-12)
    assert rec["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(10), rel=1e-12)
    assert rec["advantage_in_se"] == pytest.approx(-d.mean() / rec["se"], rel=1e-12)
    assert rec["n"] == 10 and "ipndm (5, 5)" in markdown([rec])


def test_higher_is_better_metrics_and_rows_without_samples():
    (rec,) = compute_matched(ITEMS, "score", lower_is_better=False)
    assert rec["vs"] == "dpmpp_2m"  # the highest mean within budget
    no_values = [dict(i, values=None) for i in ITEMS]
    (rec,) = compute_matched(no_values, "fd")
    assert rec["diff"] == pytest.approx(EPD.mean() - MATCHED.mean()) and math.isnan(rec["se"])


def test_best_at_each_nfe_against_its_runner_up():
    recs = {r["nfe"]: r for r in best_by_nfe(ITEMS, "rmse")}
    assert set(recs) == {3}  # one row at NFE 5 and at 7: nothing to compare
    assert (recs[3]["solver"], recs[3]["vs"]) == ("epd_distilled", "dpmpp_2m")
    assert recs[3]["advantage_in_se"] > 0
