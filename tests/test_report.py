"""`epd report`: fake MLflow runs (sqlite) -> export CSV -> tables and plots, checked against the logged numbers,
scipy's paired t-test and the original system's FLUX result JSONs."""

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from epd.cli import main
from epd.errors import ConfigError, EPDError
from epd.metrics.stats import summarize
from epd.predictor import save
from epd.report import build_report, export_runs, history_path, missing_rows
from epd.report.render import fmt_value
from epd.table import EPDTable, uniform_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import FIXTURES, needs  # noqa: E402

RESULTS = FIXTURES / "rlepd" / "results"
FLUX_DIRS = [RESULTS / "flux_baseline_eval_20260402", RESULTS / "flux_epd_step001000_eval"]
N = 24
T0 = 1_700_000_000_000   # ms

# (backbone, solver, nfe, steps) -> per-metric mean shift of the per-image scores. Chosen so that the best row
# differs between higher-is-better and lower-is-better columns, and so does the best baseline per metric.
DIGITS = {("euler", 4, 4): {"digits_alignment": 0.00, "rmse_vs_teacher": 0.18, "digits_fd": 5.0},
          ("heun", 4, 2): {"digits_alignment": 0.05, "rmse_vs_teacher": 0.20, "digits_fd": 3.0},
          ("epd_distilled", 4, 2): {"digits_alignment": 0.08, "rmse_vs_teacher": 0.10, "digits_fd": 4.0},
          ("epd_rdpo", 4, 2): {"digits_alignment": 0.12, "rmse_vs_teacher": 0.15, "digits_fd": 2.5},
          ("euler", 8, 8): {"digits_alignment": 0.10, "rmse_vs_teacher": 0.08, "digits_fd": 2.0},
          ("heun", 8, 4): {"digits_alignment": 0.11, "rmse_vs_teacher": 0.05, "digits_fd": 1.5},
          ("epd_distilled", 8, 4): {"digits_alignment": 0.13, "rmse_vs_teacher": 0.06, "digits_fd": 1.8}}
SD15 = {("euler", 10, 10): {"hps": 0.240, "imagereward": 0.02},
        ("dpmpp_3m", 10, 10): {"hps": 0.244, "imagereward": -0.03},
        ("epd_rdpo", 10, 5): {"hps": 0.248, "imagereward": 0.01},
        ("euler", 20, 20): {"hps": 0.245, "imagereward": 0.00}}
SET_METRICS = {"digits_fd"}


def _scores(rng, shifts, common, shuffle):
    seeds = list(range(N)) + ([999] if not shuffle else [])   # one baseline image the EPD run lacks
    out = {"seed": seeds, "prompt": [f"a handwritten {s % 10}" for s in seeds],
           "image": [f"{s:06d}.png" for s in seeds]}
    for m, shift in shifts.items():
        if m in SET_METRICS:
            continue
        base = np.concatenate([common[m], [0.3]]) if not shuffle else common[m]
        out[m] = (base + shift + rng.normal(0, 0.02, len(seeds))).tolist()
    order = rng.permutation(len(seeds)) if shuffle else np.arange(len(seeds))
    return [{k: v[i] for k, v in out.items()} for i in order]


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _log_eval(client, exp, tmp, rng, backbone, key, shifts, common, start, status="FINISHED"):
    from mlflow.entities import Metric

    solver, nfe, steps = key
    rows = _scores(rng, shifts, common, shuffle=solver.startswith("epd"))
    path = tmp / f"{backbone}_{solver}_{nfe}_{start}.csv"
    _write_csv(path, rows)
    metrics, logged = [], {}
    for m, shift in shifts.items():
        if m in SET_METRICS:
            metrics.append(Metric(m, shift, start, 0))
            logged[m] = (shift, math.nan)
            continue
        s = summarize([r[m] for r in rows])
        metrics += [Metric(f"{m}_{k}", float(s[v]), start, 0) for k, v in
                    (("mean", "mean"), ("se", "se"), ("std", "std"), ("count", "n"))]
        logged[m] = (s["mean"], s["se"])
    tags = {"stage": "evaluate", "backbone": backbone, "solver": solver, "nfe": str(nfe), "steps": str(steps),
            "nfe_sequential": str(nfe), "forward_passes": str(nfe * 2), "images_dir": str(tmp / "img"),
            "scores_csv": str(path), "git_sha": "abc123"}
    run = client.create_run(exp, start_time=start, tags=tags)
    client.log_batch(run.info.run_id, metrics=metrics)
    client.set_terminated(run.info.run_id, status, end_time=start + 1)
    return run.info.run_id, logged


def _log_history(client, ids, stage, backbone, nfe, tags, series, start):
    from mlflow.entities import Metric

    run = client.create_run(ids[stage], start_time=start,
                            tags={"stage": stage, "backbone": backbone, "nfe": str(nfe), **tags})
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, start + s, s) for k, pts in series.items()
                                               for s, v in pts])
    client.set_terminated(run.info.run_id, "FINISHED", end_time=start + 100)
    return run.info.run_id


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A sqlite MLflow store with evaluate, RDPO, distill and teacher runs for two backbones, and its export."""
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    ids = {name: client.create_experiment(f"epd/{name}", artifact_location=str(tmp / "artifacts" / name))
           for name in ("evaluate", "rdpo", "distill", "teacher")}
    rng = np.random.default_rng(0)
    logged, run_ids, t = {}, {}, T0
    for bb, spec in (("digits", DIGITS), ("sd15", SD15)):
        common = {m: rng.normal(0.5, 0.1, N) for m in next(iter(spec.values()))}
        for key, shifts in spec.items():
            if (bb, key) == ("digits", ("euler", 4, 4)):   # an older finished duplicate: must be replaced
                _log_eval(client, ids["evaluate"], tmp, rng, bb, key, {m: v + 1 for m, v in shifts.items()},
                          common, t)
                t += 1000
            run_ids[bb, key[0], key[1]], logged[bb, key[0], key[1]] = _log_eval(
                client, ids["evaluate"], tmp, rng, bb, key, shifts, common, t)
            t += 1000
    failed, _ = _log_eval(client, ids["evaluate"], tmp, rng, "digits", ("euler", 4, 4),
                          DIGITS["euler", 4, 4], {m: np.zeros(N) for m in DIGITS["euler", 4, 4]}, t + 10**6, "FAILED")
    distilled = uniform_table(5, 2)
    rdpo = EPDTable(distilled.positions * 0.9 + 0.05, [[0.3, 0.7]] * 4)
    dist_path, rdpo_path = save(distilled, tmp / "distill" / "table"), save(rdpo, tmp / "rdpo" / "table_best")
    steps = range(1, 11)
    series = {"mixed_reward_mean": [(s, 0.5 + 0.01 * s) for s in steps],
              "mixed_reward_std": [(s, 0.05) for s in steps], "kl": [(s, 0.001 * s * s) for s in steps],
              "eval_reward": [(5, 0.56), (10, 0.61)], "hps_mean": [(s, 0.2 + 0.001 * s) for s in steps]}
    rdpo_id = _log_history(client, ids, "rdpo", "digits", 4, {"table_best": str(rdpo_path)}, series, t + 10)
    distill_id = _log_history(client, ids, "distill", "digits", 4, {"table": str(dist_path)},
                              {"loss": [(s, 1.0 / s) for s in steps], "final_rmse": [(10, 0.1)]}, t + 20)
    _log_history(client, ids, "teacher", "digits", 4, {}, {"seconds": [(0, 3.0)]}, t + 30)
    runs_csv = tmp / "results" / "runs.csv"
    summary = export_runs(uri, runs_csv)
    return dict(tmp=tmp, uri=uri, runs_csv=runs_csv, logged=logged, run_ids=run_ids, failed=failed,
                rdpo_id=rdpo_id, distill_id=distill_id, series=series, summary=summary)


@pytest.fixture(scope="module")
def report(world):
    out = world["tmp"] / "reports"
    written = build_report(world["runs_csv"], out)
    return out, written


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _table(out, bb):
    return {(r["solver"], float(r["nfe"]) if r["nfe"] else math.nan): r for r in _read_csv(out / bb / "table.csv")}


def _scores_by_key(path, metric):
    return {(r["seed"], r["prompt"]): float(r[metric]) for r in _read_csv(path)}


# ---------------------------------------------------------------------------------------------- export
def test_export_keeps_latest_finished_run_and_is_deterministic(world):
    rows = _read_csv(world["runs_csv"])
    evals = [r for r in rows if r["experiment"] == "epd/evaluate"]
    assert len(evals) == len(DIGITS) + len(SD15)           # one per (backbone, solver, nfe)
    euler4 = [r for r in evals if (r["tags.backbone"], r["tags.solver"], r["tags.nfe"]) == ("digits", "euler", "4")]
    assert [r["run_id"] for r in euler4] == [world["run_ids"]["digits", "euler", 4]]   # not the older, not FAILED
    assert world["failed"] not in {r["run_id"] for r in rows}
    assert {r["experiment"] for r in rows} == {"epd/evaluate", "epd/rdpo", "epd/distill", "epd/teacher"}
    again = world["tmp"] / "again" / "runs.csv"
    export_runs(world["uri"], again)
    assert again.read_bytes() == world["runs_csv"].read_bytes()
    assert history_path(again).read_bytes() == history_path(world["runs_csv"]).read_bytes()


def test_export_history_holds_rdpo_and_distill_curves(world):
    hist = _read_csv(history_path(world["runs_csv"]))
    assert {r["run_id"] for r in hist} == {world["rdpo_id"], world["distill_id"]}   # teacher runs have no history
    kl = [(int(r["step"]), float(r["value"])) for r in hist if r["run_id"] == world["rdpo_id"] and r["key"] == "kl"]
    assert kl == world["series"]["kl"]


def test_export_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(EPDError, match="does not exist"):
        export_runs(f"sqlite:///{tmp_path / 'nope.db'}", tmp_path / "runs.csv")
    assert not (tmp_path / "runs.csv").exists()


# ---------------------------------------------------------------------------------------------- tables
def test_fmt_value():
    assert fmt_value(0.25, 0.0123) == "0.250 ± 0.012"
    assert fmt_value(22.809326, 0.049133) == "22.809 ± 0.049"
    assert fmt_value(26.651) == "26.65" and fmt_value(0.29468) == "0.2947"
    assert fmt_value(1.0, 0.0) == "1.000 ± 0" and fmt_value(math.nan) == "–"


def test_table_values_equal_logged_means_and_ses(world, report):
    out, written = report
    assert written == {"digits": ["euler", "heun", "epd_distilled", "epd_rdpo"],
                       "sd15": ["euler", "dpmpp_3m", "epd_rdpo"]}
    for bb, spec in (("digits", DIGITS), ("sd15", SD15)):
        table = _table(out, bb)
        md = (out / bb / "table.md").read_text()
        assert len(table) == len(spec)
        for (solver, nfe, steps), shifts in spec.items():
            row = table[solver, float(nfe)]
            assert row["run_id"] == world["run_ids"][bb, solver, nfe]
            assert float(row["steps"]) == steps and float(row["forward_passes"]) == 2 * nfe
            for m in shifts:
                mean, se = world["logged"][bb, solver, nfe][m]
                assert float(row[f"{m}_mean"]) == mean
                assert (row[f"{m}_se"] == "") if m in SET_METRICS else (float(row[f"{m}_se"]) == se)
                assert fmt_value(mean, se) in md


def _bold_cells(md: str) -> set[tuple[str, str, str]]:
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    head = [h.strip() for h in lines[0].strip("|").split("|")]
    out = set()
    for line in lines[1:]:
        if line.startswith("| Solver"):          # the paired table starts
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        out |= {(cells[0], cells[2], head[i]) for i, c in enumerate(cells) if c.startswith("**")}
    return out


def test_best_mark_respects_direction_per_nfe(world, report):
    out, _ = report
    labels = {"digits_alignment": "Alignment ↑", "rmse_vs_teacher": "RMSE vs teacher ↓", "digits_fd": "FD ↓"}
    expected = set()
    table = _table(out, "digits")
    for nfe in (4, 8):
        keys = [k for k in DIGITS if k[1] == nfe]
        for m, label in labels.items():
            vals = {k[0]: world["logged"]["digits", k[0], nfe][m][0] for k in keys}
            pick = (max if label.endswith("↑") else min)(vals, key=vals.get)
            expected.add((pick, str(nfe), label))
            for solver in vals:
                assert table[solver, float(nfe)][f"{m}_best"] == str(int(solver == pick))
    assert ("epd_rdpo", "4", "Alignment ↑") in expected and ("epd_distilled", "4", "RMSE vs teacher ↓") in expected
    assert _bold_cells((out / "digits" / "table.md").read_text()) == expected
    tex = (out / "digits" / "table.tex").read_text()
    assert tex.count(r"\textbf{") == len(expected)


def test_paired_p_values_match_scipy_ttest_rel(world, report):
    out, _ = report
    checked = 0
    for bb, spec in (("digits", DIGITS), ("sd15", SD15)):
        table = _table(out, bb)
        for (solver, nfe, _), shifts in spec.items():
            row = table[solver, float(nfe)]
            for m in (m for m in shifts if m not in SET_METRICS):
                if not solver.startswith("epd"):
                    assert row[f"{m}_p"] == ""
                    continue
                bases = {k[0]: world["logged"][bb, k[0], nfe][m][0] for k in spec
                         if k[1] == nfe and not k[0].startswith("epd")}
                best = (min if m == "rmse_vs_teacher" else max)(bases, key=bases.get)
                a = _scores_by_key(_scores_path(world, bb, solver, nfe), m)
                b = _scores_by_key(_scores_path(world, bb, best, nfe), m)
                keys = sorted(set(a) & set(b))
                ref = stats.ttest_rel([a[k] for k in keys], [b[k] for k in keys])
                assert row[f"{m}_vs"] == best and int(row[f"{m}_pairs"]) == N == len(keys)
                assert float(row[f"{m}_p"]) == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-300)
                assert float(row[f"{m}_diff"]) == pytest.approx(np.mean([a[k] - b[k] for k in keys]), rel=1e-12)
                checked += 1
    assert checked == 2 * (2 + 1 + 1)     # 2 image metrics x EPD rows (digits NFE 4: 2, NFE 8: 1; sd15: 1)
    md = (out / "digits" / "table.md").read_text()
    assert "EPD vs the best baseline at the same NFE" in md


def _scores_path(world, bb, solver, nfe):
    rows = _read_csv(world["runs_csv"])
    return next(r["tags.scores_csv"] for r in rows if r["run_id"] == world["run_ids"][bb, solver, nfe])


def test_pngs_are_valid_images(report):
    from PIL import Image

    out, _ = report
    for name in ("metric_vs_nfe.png", "rdpo_curves.png", "distill_loss.png", "epd_tables.png"):
        with Image.open(out / "digits" / name) as im:
            im.verify()
        with Image.open(out / "digits" / name) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    assert (out / "sd15" / "metric_vs_nfe.png").is_file()
    assert not (out / "sd15" / "rdpo_curves.png").exists()           # no RDPO runs for sd15
    readme = (out / "README.md").read_text()
    for link in ("digits/table.md", "digits/table.tex", "digits/epd_tables.png", "sd15/table.csv", "`abc123`"):
        assert link in readme
    assert "AFS" in readme and "CFG" in readme


def test_build_is_deterministic(world, report):
    out, _ = report
    again = world["tmp"] / "reports_again"
    build_report(world["runs_csv"], again)
    for rel in ("README.md", "digits/table.md", "digits/table.tex", "sd15/table.csv"):
        assert (again / rel).read_text() == (out / rel).read_text()


# ---------------------------------------------------------------------------------------------- external rows
@needs("rlepd/results")
def test_external_flux_rows_with_imagereward_converted(world, tmp_path):
    written = build_report(world["runs_csv"], tmp_path, external=[str(d) for d in FLUX_DIRS], backbones="flux,sd15")
    assert set(written) == {"flux", "sd15"}
    assert sorted(written["flux"]) == ["dpm2", "edm", "epd_step001000", "euler", "ipndm"]
    table = {r["solver"]: r for r in _read_csv(tmp_path / "flux" / "table.csv")}
    names = {"hps": "hps", "pick": "pickscore", "imagereward": "imagereward", "clip": "clip",
             "aesthetic": "aesthetic", "mps": "mps"}
    n_files = 0
    for folder in FLUX_DIRS:
        for path in folder.glob("*.json"):
            prefix, _, metric = path.stem.rpartition("_")
            solver = prefix.split("_", 1)[1].rsplit("_", 1)[0] if "epd" not in prefix else "epd_step001000"
            st = json.loads(path.read_text())["stats"]
            row = table[solver]
            shift = 3 * 1.03334 if metric == "imagereward" else 0.0
            assert float(row[f"{names[metric]}_mean"]) == pytest.approx(st["mean"] - shift, abs=1e-5)
            assert float(row[f"{names[metric]}_se"]) == pytest.approx(st["std"] / math.sqrt(st["count"] - 1))
            assert row["source"] == "original RLEPD"
            n_files += 1
    assert n_files == 30
    assert float(table["epd_step001000"]["imagereward_mean"]) == pytest.approx(1.0145, abs=1e-4)  # spec §9.3: 4.1145
    assert table["epd_step001000"]["hps_best"] == "1" and table["euler"]["steps"] == "20.0"
    md = (tmp_path / "flux" / "table.md").read_text()
    assert "original RLEPD" in md and "3·1.03334" in md and "1.015 ± 0.027†" in md
    assert not (tmp_path / "digits").exists()                                     # --backbones filter


def test_unknown_backbone_and_missing_csv_are_errors(world, tmp_path):
    with pytest.raises(ConfigError, match="nope"):
        build_report(world["runs_csv"], tmp_path, backbones=["nope"])
    with pytest.raises(EPDError, match="export it first"):
        build_report(tmp_path / "missing.csv", tmp_path)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_expect_rows(world, tmp_path, capsys, monkeypatch):
    expect = tmp_path / "rows.json"
    expect.write_text(json.dumps({"digits": ["euler", "epd_rdpo@4", "epd_rdpo@8"], "sd15": ["heun"],
                                  "sd3": ["euler"]}))
    out = tmp_path / "reports"
    rc = main(["report", "--build-only", "--runs-csv", str(world["runs_csv"]), "--out", str(out),
               "--expect-rows", str(expect)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "digits: epd_rdpo@8" in err and "sd15: heun" in err and "sd3: euler (no table written)" in err
    assert "digits: euler\n" not in err and "epd_rdpo@4" not in err
    assert missing_rows({"digits": ["euler@8", "heun"]}, out) == []
    expect.write_text(json.dumps({"digits": ["euler@4", "epd_rdpo@4"], "sd15": ["epd_rdpo"]}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world["uri"])   # default: export, then build
    rc = main(["report", "--runs-csv", str(tmp_path / "runs.csv"), "--out", str(out), "--expect-rows", str(expect)])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "runs.csv").read_bytes() == world["runs_csv"].read_bytes()
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert main(["report", "--export-only", "--runs-csv", str(tmp_path / "x.csv")]) == 2
    assert "MLFLOW_TRACKING_URI" in capsys.readouterr().err


def test_configured_pairs_that_cannot_run_are_listed_in_the_notes(world, tmp_path):
    build_report(world["runs_csv"], tmp_path, backbones="sd15", skipped={"sd15": ["heun@5", "dpm2@5"]})
    md = (tmp_path / "sd15" / "table.md").read_text()
    assert "Configured but not run: heun@5, dpm2@5" in md
    build_report(world["runs_csv"], tmp_path / "none", backbones="sd15")
    assert "Configured but not run" not in (tmp_path / "none" / "sd15" / "table.md").read_text()
