"""RDPO's plateau rule: hand-computed decisions on a synthetic metric sequence, and a live stop that equals the
rule replayed over an uninterrupted run's checkpoints (same stop step, same selected table, same history)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from _rdpo_tiny import table_bytes, tiny_trainer
from epd.bench.rdpo import replay_stop, shortfall_readings, stop_rule
from epd.errors import ConfigError
from epd.rdpo.stopping import PlateauStopper, make_stopper, paired_gain_se, slope_with_se

pytestmark = pytest.mark.usefixtures("one_thread")

N = 100
ALT = torch.tensor([1.0, -1.0] * (N // 2), dtype=torch.float64)  # mean 0; unbiased std sqrt(N / (N - 1))
SE1 = math.sqrt(N / (N - 1)) / math.sqrt(N)                      # SE of a paired difference with noise ALT


def _evals(levels):
    """Evaluation t: every seed scores ``levels[t]`` plus ``t * ALT``, so the paired difference between
    evaluations t and u has mean ``levels[t] - levels[u]`` and SE ``|t - u| * SE1``."""
    return [lv + t * ALT for t, lv in enumerate(levels)]


LEVELS = [0.0, 0.5, 0.55, 0.65, 0.9, 0.9, 0.85, 0.95]


def test_paired_gain_in_standard_errors():
    e = _evals(LEVELS)
    assert paired_gain_se(e[1], e[0]) == pytest.approx(0.5 / SE1)
    assert paired_gain_se(e[3], e[1]) == pytest.approx(0.15 / (2 * SE1))
    assert paired_gain_se(e[0] + 1, e[0]) == math.inf and paired_gain_se(e[0], e[0]) == 0.0
    with pytest.raises(ConfigError, match="scores against"):
        paired_gain_se(e[0][:5], e[0])


@pytest.mark.parametrize("patience, stop_eval, ref_eval", [(2, 3, 1), (3, 7, 4), (5, None, 4)])
def test_stops_after_patience_evaluations_without_a_one_se_gain(patience, stop_eval, ref_eval):
    # gains over the reference, in SE: e1 4.97 (progress); e2 0.50, e3 0.75 (vs e1); e4 (0.40 / 3 SE1) = 1.33
    # (progress: the slow climb adds up); e5 0, e6 -0.08, e7 0.08 (vs e4)
    e = _evals(LEVELS)
    st = PlateauStopper(patience, 1.0)
    st.start(e[0], 0)
    stopped = None
    for t in range(1, len(e)):
        if st.update(10 * t, e[t]):
            stopped = t
            break
    assert stopped == stop_eval
    assert st.ref_step == 10 * ref_eval
    assert [x["progress"] for x in st.log] == [True, False, False, True, False, False, False][:len(st.log)]
    if stop_eval:
        assert st.stopped_at == 10 * stop_eval and f"over step {10 * ref_eval}" in st.reason


def _replay(levels, guard_ok, patience, min_gain_se):
    """The bench's replay over a planted curve: (stop evaluation, selected evaluation = best guarded so far)."""
    e = _evals(levels)
    st = PlateauStopper(patience, min_gain_se)
    st.start(e[0], 0)
    best = 0
    for t in range(1, len(e)):
        if guard_ok[t] and levels[t] > levels[best]:
            best = t
        if st.update(t, e[t], guard_ok[t]):
            return t, best
    return None, best


# The two shapes measured on digits (bench rdpo): a peak early, then a plateau that wobbles below it with
# high-reward evaluations the FD guard rejects (3 PPO epochs, evaluation every 5 steps) ...
PEAK = [0.0, 0.9, 0.6, 1.9, 1.2, 1.1, 1.3, 0.5, 0.7, 1.6, 1.9]
PEAK_OK = [True] * 6 + [False] + [True] * 4
# ... and a plateau whose best guarded evaluation comes late (1 epoch, every 10 steps): evaluation 10 comes 6
# evaluations after the last progress (4), so a rule patient enough to reach it cannot stop before the budget.
LATE = [0.0, 1.1, 0.9, 2.4, 1.55, 2.9, 0.1, 1.45, 1.7, 1.3, 2.3, 0.95, 2.4, 1.2, 1.0, 1.8]
LATE_OK = [True, True, True, False, True, False, True, True, False, True, True, True, False, True, True, True]


@pytest.mark.parametrize("levels, ok, patience, expect", [
    (PEAK, PEAK_OK, 3, (6, 3)),      # gains over step 3 are negative: 3 evaluations later it stops, keeping 3
    (PEAK, PEAK_OK, 2, (5, 3)),
    (PEAK, PEAK_OK, 8, (None, 3)),   # evaluation 10 ties the peak: neither progress nor selected
    (LATE, LATE_OK, 3, (7, 4)),      # 4: 0.45 / (3 SE1) = 1.49 SE; then 5 (guard), 6, 7 without progress
    (LATE, LATE_OK, 5, (9, 4)),
    (LATE, LATE_OK, 6, (None, 10)),  # 10: 0.75 / (6 SE1) = 1.24 SE, progress; 11-15 are 5: the budget ends it
])
def test_planted_curves_stop_where_the_rule_says_and_select_the_best_guarded(levels, ok, patience, expect):
    assert _replay(levels, ok, patience, 1.0) == expect


def test_slope_and_its_standard_error_by_hand():
    assert slope_with_se([0, 5, 10], [1, 11, 21]) == (2.0, 0.0)
    # dx = (-1.5, -0.5, 0.5, 1.5), Sxx = 5, slope 1 / 5; residuals (-0.2, 0.6, -0.6, 0.2): SE sqrt(0.8 / 2 / 5)
    b, se = slope_with_se([0, 1, 2, 3], [0, 1, 0, 1])
    assert b == pytest.approx(0.2) and se == pytest.approx(math.sqrt(0.08))


TREND = [0.0, 1.0, 2.0, 3.0, 3.0, 2.9, 2.8]  # evaluations every 10 steps


@pytest.mark.parametrize("slope_se, guard_fail, stop_step, slope, se", [
    # steps 30-50: levels 3, 3, 2.9: slope -0.005 per step, residuals (-1, 2, -1) / 60: SE sqrt(1 / 120000)
    (1.0, None, 50, -0.005, math.sqrt(1 / 120000)),   # -0.005 + 0.00289 <= 0
    (0.0, None, 50, -0.005, math.sqrt(1 / 120000)),
    (2.0, None, 60, -0.01, 0.0),                      # -0.005 + 0.00577 > 0; steps 40-60 lie on a line
    # 50 fails the guard: no test there; steps 30, 40, 60: slope -1 / 140, SE sqrt(0.002857 / 466.67)
    (1.0, 5, 60, -1 / 140, math.sqrt((2 / 700) / (1400 / 3))),
])
def test_trend_rule_stops_once_the_guarded_slope_is_not_positive(slope_se, guard_fail, stop_step, slope, se):
    e = _evals(TREND)
    st = make_stopper("trend", stop_window=3, stop_slope_se=slope_se)
    st.start(e[0], 0)
    stopped = next((10 * t for t in range(1, len(e)) if st.update(10 * t, e[t], guard_ok=t != guard_fail)), None)
    assert stopped == stop_step == st.stopped_at
    last = st.log[-1]
    assert last["slope"] == pytest.approx(slope) and last["slope_se"] == pytest.approx(se, abs=1e-12)
    assert "slope" not in st.log[1] and st.reason.startswith("trend:")  # fewer than 3 guarded points: no test
    assert [x["gain_se"] for x in st.log] == pytest.approx([paired_gain_se(e[t], e[0]) for t in range(1, len(st.log) + 1)])


def test_guard_failure_is_never_progress_and_patience_zero_never_stops():
    e = _evals(LEVELS)
    st = PlateauStopper(1, 1.0)
    st.start(e[0], 0)
    assert st.update(10, e[1], guard_ok=False) and st.ref_step == 0
    off = PlateauStopper(0, 1.0)
    off.start(e[0], 0)
    assert not any(off.update(10 * t, e[1]) for t in range(1, 20)) and len(off.log) == 19
    for bad in ({"stop_patience": -1}, {"stop_min_gain_se": -0.5}, {"stop_min_gain_se": math.nan},
                {"stop_rule": "slope"}, {"stop_window": 2}, {"stop_window": 4.5}, {"stop_slope_se": -1.0}):
        with pytest.raises(ConfigError, match="rdpo.stop_"):
            tiny_trainer("unused", **bad)


@pytest.mark.parametrize("rule, reason", [({"stop_patience": 2, "stop_min_gain_se": 25.0}, "plateau"),
                                          ({"stop_rule": "trend", "stop_window": 3, "stop_slope_se": 0.0}, "trend")])
def test_live_stop_equals_rule_replayed_on_the_full_run(tmp_path, rule, reason):
    full = tiny_trainer(tmp_path / "full", steps=12)
    full.train()
    rep = replay_stop(tiny_trainer(tmp_path / "full", steps=12), **rule)
    assert rep["stopped_at"] < 12, "the rule must stop this run early for the test to mean anything"
    live = tiny_trainer(tmp_path / "live", steps=12, **rule)
    live.train()
    stop = json.loads((tmp_path / "live" / "stop.json").read_text())
    assert live.step == stop["stopped_at"] == rep["stopped_at"]
    assert stop["selected_step"] == rep["selected_step"] and stop["reason"].startswith(reason)
    # the trend rule logs each evaluation's gain over the start, the plateau rule (the full run's) over its reference
    drop = {"elapsed_sec"} | ({"eval_gain_se"} if reason == "trend" else set())
    strip = lambda h: [{k: v for k, v in r.items() if k not in drop} for r in h]  # noqa: E731
    assert strip(live.history) == strip(full.history)[: len(live.history)]
    sel = torch.load(tmp_path / "full" / "checkpoints" / f"policy-step{rep['selected_step']:06d}.pt")
    full.policy.load_state_dict(sel)
    from epd.predictor import load

    assert torch.equal(load(tmp_path / "live" / "table_best.safetensors").positions,
                       full.policy.mean_table(meta=full.start.meta).positions)
    before = table_bytes(tmp_path / "live")
    again = tiny_trainer(tmp_path / "live", steps=12, **rule)
    again.train()  # a finished (stopped) run does not train on when its command runs again
    assert again.step == live.step and table_bytes(tmp_path / "live") == before


def test_report_notes_name_the_selected_step_and_the_reason():
    from epd.report.build import _rdpo_stop_notes

    runs = [{"run_id": "a", "nfe": 5.0, "tags.stop_reason": "plateau: no held-out gain of >= 1 SE over step 40 in "
             "3 evaluation(s)", "tags.selected_step": "40"},
            {"run_id": "b", "nfe": 7.0, "tags.preempted_at_step": "12"}]  # an interrupted run: nothing to say
    assert _rdpo_stop_notes(runs) == ["RDPO NFE 5: table from step 40 (best held-out checkpoint); training ended by "
                                      "plateau: no held-out gain of >= 1 SE over step 40 in 3 evaluation(s)."]


@pytest.mark.parametrize("shortfall, within, within_paired", [(0.05, True, False), (0.01, True, True),
                                                               (0.15, False, False), (-0.02, True, True)])
def test_shortfall_read_against_the_fixed_gain_se_and_the_paired_se(shortfall, within, within_paired):
    # base 0; fixed = 1 + ALT: gain 1 with paired SE SE1; selected = fixed - shortfall - 0.2 ALT: the paired
    # difference fixed - selected has mean `shortfall` and SE 0.2 SE1 (SE1 ~ 0.1005)
    base = torch.zeros(N, dtype=torch.float64)
    fixed = 1.0 + ALT
    sel = fixed - shortfall - 0.2 * ALT
    r = shortfall_readings(fixed.numpy(), sel.numpy(), base.numpy())
    assert r["early_stop_shortfall"] == pytest.approx(shortfall)
    assert r["early_stop_fixed_gain_se"] == pytest.approx(SE1)
    assert r["early_stop_shortfall_se"] == pytest.approx(0.2 * SE1)
    assert (r["early_stop_within_1se"], r["early_stop_within_1se_paired"]) == (within, within_paired)


def test_bench_replays_the_configs_rule_unless_the_command_line_names_one():
    from argparse import Namespace

    from epd.bench.rdpo import _stop_flags
    from epd.rdpo.trainer import RDPOConfig

    on = RDPOConfig(stop_patience=4, stop_min_gain_se=0.5)
    assert stop_rule(on) == {"stop_patience": 4, "stop_min_gain_se": 0.5, "from": "config"}
    assert stop_rule(on, {"stop_patience": 2}) == {"stop_patience": 2, "stop_min_gain_se": 0.5,
                                                   "from": "config and command line"}
    assert stop_rule(RDPOConfig()) == {"stop_patience": 3, "stop_min_gain_se": 1.0, "from": "bench default"}
    trend = RDPOConfig(stop_rule="trend", stop_window=5)
    assert stop_rule(trend) == {"stop_rule": "trend", "stop_window": 5, "stop_slope_se": 1.0, "from": "config"}
    assert stop_rule(RDPOConfig(), {"stop_rule": "trend"})["stop_window"] == 6
    args = Namespace(stop_rule=None, stop_patience=6, stop_min_gain_se=None, stop_window=None, stop_slope_se=None)
    assert _stop_flags(args) == {"stop_patience": 6}
    with pytest.raises(ConfigError, match="rdpo.stop_window"):
        stop_rule(trend, {"stop_window": 2})
