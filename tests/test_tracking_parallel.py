"""Parallel Snakemake jobs on a fresh MLflow SQLite database: every job logs its run (without the lock around
MLflow's schema creation, 3 of 4 simultaneous first jobs died with "duplicate column name")."""

import multiprocessing as mp

import pytest


def _job(i: int, uri: str) -> None:
    from epd import tracking

    with tracking.start_run(f"stage{i % 2}", backbone="b", tracking_uri=uri, params={"i": i}) as run:
        run.metrics({"value": float(i)})


@pytest.mark.slow
def test_simultaneous_first_jobs_all_log(tmp_path):
    pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_job, args=(i, uri)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["epd/stage0", "epd/stage1"])
    assert sorted(runs["params.i"].astype(int)) == [0, 1, 2, 3]
