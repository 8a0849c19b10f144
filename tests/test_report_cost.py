"""reports/<backbone>/cost.md: each stage's per-item time from its MLflow runs' start and end times, projected to
the paper-scale counts of the config's ``paper_scale`` block (hand-computed answers on planted runs)."""

import math

import pytest

from epd.report import build_report, export_runs
from epd.report.cost import paper_scale, run_items, stage_costs

T0 = 1_700_000_000_000  # ms
# stage -> (params, metrics, wall seconds)
PLANTED = {
    "teacher": ({"seeds": "0-127 (128)"}, {}, 64.0),            # 0.5 s per trajectory
    "distill": ({"iterations": "20"}, {}, 10.0),                # 0.5 s per iteration
    "rdpo": ({"steps": "10"}, {"stopped_at": 4.0}, 8.0),        # stopped after 4 steps: 2 s per step
    "sample": ({"seeds": "900000-900009"}, {}, 5.0),            # 0.5 s per image
}
EVAL_WALL, EVAL_IMAGES = 20.0, 10                               # 2 s per image (all metrics)


def _log(client, exp, tags, params, metrics, start, seconds):
    from mlflow.entities import Metric, Param

    run = client.create_run(exp, start_time=start, tags=tags)
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, start, 0) for k, v in metrics.items()],
                     params=[Param(k, v) for k, v in params.items()])
    client.set_terminated(run.info.run_id, "FINISHED", end_time=start + int(seconds * 1000))


@pytest.fixture(scope="module")
def runs_csv(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("cost")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    t = T0
    for stage, (params, metrics, wall) in PLANTED.items():
        exp = client.create_experiment(f"epd/{stage}", artifact_location=str(tmp / "a" / stage))
        _log(client, exp, {"stage": stage, "backbone": "bb", "nfe": "5", "solver": "euler", "gpu": "Planted GPU"},
             params, metrics, t, wall)
        t += 100_000
    exp = client.create_experiment("epd/evaluate", artifact_location=str(tmp / "a" / "evaluate"))
    for solver in ("euler", "epd_distilled"):
        _log(client, exp, {"stage": "evaluate", "backbone": "bb", "nfe": "5", "solver": solver, "steps": "5",
                           "gpu": "Planted GPU"},
             {"num_images": str(EVAL_IMAGES)}, {"hps_mean": 0.2, "hps_se": 0.01, "hps_std": 0.03,
                                                "hps_count": float(EVAL_IMAGES)}, t, EVAL_WALL)
        t += 100_000
    path = tmp / "runs.csv"
    export_runs(uri, path)
    return path


def test_per_item_times_and_projection_equal_the_planted_ones(runs_csv):
    from epd.report.export import read_runs

    runs = read_runs(runs_csv)
    scale = {"eval_prompts": 1000, "rdpo_steps": 9000}
    got = {c.stage: c for c in stage_costs(runs, "bb", scale)}
    assert [c for c in got] == ["teacher", "distill", "rdpo", "sample", "evaluate"]
    assert got["teacher"].per_item_s == pytest.approx(0.5) and got["teacher"].paper_items == 128  # own count kept
    assert got["distill"].per_item_s == pytest.approx(0.5) and got["distill"].paper_items == 20
    assert got["rdpo"].items == 4 and got["rdpo"].per_item_s == pytest.approx(2.0)
    assert got["rdpo"].projected_hours == pytest.approx(2.0 * 9000 / 3600)
    assert got["sample"].projected_hours == pytest.approx(0.5 * 1000 / 3600)
    assert got["evaluate"].runs == 2 and got["evaluate"].per_item_s == pytest.approx(2 * EVAL_WALL / (2 * EVAL_IMAGES))
    assert got["evaluate"].projected_hours == pytest.approx(2.0 * 2 * 1000 / 3600)
    assert stage_costs(runs, "other", scale) == []


def test_without_paper_scale_the_projection_is_the_measured_time(runs_csv):
    from epd.report.export import read_runs

    for c in stage_costs(read_runs(runs_csv), "bb", paper_scale({})):
        assert c.projected_hours == pytest.approx(c.seconds / 3600)


def test_items_of_a_run_that_did_not_record_them_are_unknown():
    assert math.isnan(run_items({"params.seeds": "not a spec"}, "sample"))
    assert math.isnan(run_items({}, "distill"))
    assert run_items({"params.steps": "10"}, "rdpo") == 10.0  # not stopped: the configured steps


def test_report_writes_cost_md_with_the_total(runs_csv, tmp_path):
    out = tmp_path / "reports"
    build_report(runs_csv, out, scales={"bb": {"eval_prompts": 1000, "rdpo_steps": 9000}})
    text = (out / "bb" / "cost.md").read_text()
    total = (64 + 10 + 2 * 9000 + 0.5 * 1000 + 2 * 2 * 1000) / 3600
    assert f"**{total:.3g}**" in text
    assert "Planted GPU" in text and "39.3 H200-hours" in text
    assert "bb/cost.md" in (out / "README.md").read_text()
