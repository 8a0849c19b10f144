"""RDPO's plateau rule: hand-computed decisions on a synthetic metric sequence, and a live stop that equals the
rule replayed over an uninterrupted run's checkpoints (same stop step, same selected table, same history)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from _rdpo_tiny import table_bytes, tiny_trainer
from epd.bench.rdpo import replay_stop
from epd.errors import ConfigError
from epd.rdpo.stopping import PlateauStopper, paired_gain_se

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


def test_guard_failure_is_never_progress_and_patience_zero_never_stops():
    e = _evals(LEVELS)
    st = PlateauStopper(1, 1.0)
    st.start(e[0], 0)
    assert st.update(10, e[1], guard_ok=False) and st.ref_step == 0
    off = PlateauStopper(0, 1.0)
    off.start(e[0], 0)
    assert not any(off.update(10 * t, e[1]) for t in range(1, 20)) and len(off.log) == 19
    for bad in ({"stop_patience": -1}, {"stop_min_gain_se": -0.5}, {"stop_min_gain_se": math.nan}):
        with pytest.raises(ConfigError, match="rdpo.stop_"):
            tiny_trainer("unused", **bad)


def test_live_stop_equals_rule_replayed_on_the_full_run(tmp_path):
    full = tiny_trainer(tmp_path / "full", steps=12)
    full.train()
    rep = replay_stop(tiny_trainer(tmp_path / "full", steps=12), 2, 25.0)
    assert rep["stopped_at"] < 12, "the rule must stop this run early for the test to mean anything"
    live = tiny_trainer(tmp_path / "live", steps=12, stop_patience=2, stop_min_gain_se=25.0)
    live.train()
    stop = json.loads((tmp_path / "live" / "stop.json").read_text())
    assert live.step == stop["stopped_at"] == rep["stopped_at"]
    assert stop["selected_step"] == rep["selected_step"] and stop["reason"].startswith("plateau")
    strip = lambda h: [{k: v for k, v in r.items() if k != "elapsed_sec"} for r in h]  # noqa: E731
    assert strip(live.history) == strip(full.history)[: len(live.history)]
    sel = torch.load(tmp_path / "full" / "checkpoints" / f"policy-step{rep['selected_step']:06d}.pt")
    full.policy.load_state_dict(sel)
    from epd.predictor import load

    assert torch.equal(load(tmp_path / "live" / "table_best.safetensors").positions,
                       full.policy.mean_table(meta=full.start.meta).positions)
    before = table_bytes(tmp_path / "live")
    again = tiny_trainer(tmp_path / "live", steps=12, stop_patience=2, stop_min_gain_se=25.0)
    again.train()  # a finished (stopped) run does not train on when its command runs again
    assert again.step == live.step and table_bytes(tmp_path / "live") == before


def test_report_notes_name_the_selected_step_and_the_reason():
    from epd.report.build import _rdpo_stop_notes

    runs = [{"run_id": "a", "nfe": 5.0, "tags.stop_reason": "plateau: no held-out gain of >= 1 SE over step 40 in "
             "3 evaluation(s)", "tags.selected_step": "40"},
            {"run_id": "b", "nfe": 7.0, "tags.preempted_at_step": "12"}]  # an interrupted run: nothing to say
    assert _rdpo_stop_notes(runs) == ["RDPO NFE 5: table from step 40 (best held-out checkpoint); training ended by "
                                      "plateau: no held-out gain of >= 1 SE over step 40 in 3 evaluation(s)."]
