"""benchmarks/gpu_rdpo_dp.py (issue 25) exercised on the CPU: two gloo processes give the one-process table, step
times come from the right metrics.jsonl intervals, and a machine without the GPUs gives rows that say so."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_rdpo_dp import bench_config, start_table, step_times, table_diff
from epd.config import load_config
from epd.predictor import load

ROOT = Path(__file__).resolve().parents[1]


def _bench(tmp_path, *extra, timeout=240):
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "benchmarks/gpu_rdpo_dp.py", "--study", "configs/smoke_sd3.yaml:smoke_sd3", "--size",
           "tiny", "--out", str(out), "--workdir", str(tmp_path / "work"), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def test_step_times_leave_out_the_warm_up_and_intervals_holding_an_evaluation():
    # evaluations after steps 3 and 6 (each record's clock is read before its evaluation, so step 3's evaluation
    # lies in step 4's interval); step 1 holds the warm-up
    elapsed = {1: 10.0, 2: 12.0, 3: 14.2, 4: 30.2, 5: 32.6, 6: 35.2}
    hist = [{"step": 0, "eval_reward": 0.5}]
    hist += [{"step": s, "elapsed_sec": t, **({"eval_reward": 0.6} if s in (3, 6) else {})}
             for s, t in elapsed.items()]
    got = step_times(hist[::-1])  # record order does not matter
    assert got["timed_steps"] == [2, 3, 5, 6]
    assert got["step_s"] == pytest.approx(statistics.median([2.0, 2.2, 2.4, 2.6]))
    assert got["intervals"][1] == 10.0 and got["intervals"][4] == pytest.approx(16.0)
    # nothing but the warm-up step: it is used rather than nothing
    assert step_times([{"step": 0, "eval_reward": 0.1}, {"step": 1, "elapsed_sec": 5.0, "eval_reward": 0.2}]) \
        == {"step_s": 5.0, "timed_steps": [1], "intervals": {1: 5.0}}


@pytest.mark.parametrize("config, name, n_points", [("sd3_1024", "sd3_1024", 11), ("flux_dev", "flux_dev", 9)])
def test_config_keeps_the_paper_batch_settings_and_evaluates_only_at_the_ends(config, name, n_points):
    full = load_config(f"configs/{config}.yaml")
    ref, r = full["backbones"][name]["rdpo"], bench_config(full, name, 4, 2)["backbones"][name]["rdpo"]
    assert (r["rollout_batch_size"], r["rloo_k"]) == (8, 4)
    for key in ("rollout_batch_size", "rloo_k", "minibatch_size", "eval_batch", "learning_rate", "ppo_epochs"):
        assert r[key] == ref[key], key
    assert r["rewards"] == {"hps": 1.0} and r["steps"] == 4 and r["eval_interval"] == r["save_interval"] == 5
    assert r["eval"]["seeds"] == "100000-100001"
    table = start_table(bench_config(full, name, 4, 2)["backbones"][name])
    assert (table.num_steps, table.num_points) == (n_points, 2) and table.meta["backbone"] == full["backbones"][
        name]["kind"]


def test_table_diff_counts_a_missing_scale_as_ones():
    a = start_table(load_config("configs/smoke_sd3.yaml")["backbones"]["smoke_sd3"])
    b = type(a)(a.positions + 1e-3, a.weights, scale_dir=torch.full(a.positions.shape, 1.25), meta=a.meta)
    assert table_diff(a, a) == 0.0 and table_diff(a, b) == pytest.approx(0.25) and table_diff(b, a) == table_diff(a, b)


def test_two_gloo_processes_give_the_one_process_table(tmp_path):
    proc, doc = _bench(tmp_path, "--device", "cpu", "--gpus", "2", "--steps", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["gpus"]: r for r in doc["rows"]}
    assert sorted(rows) == [1, 2] and doc["complete"] and all(r["ok"] for r in rows.values())
    runs = tmp_path / "work" / "smoke_sd3"
    one, two = (load(runs / f"gpus{g}" / "table_final.safetensors") for g in (1, 2))
    init = load(runs / "init.safetensors")
    assert set(one.tensors()) == set(two.tensors()) == {"positions", "weights"}
    diff = max(float((v - two.tensors()[k]).abs().max()) for k, v in one.tensors().items())
    moved = max(float((v - init.tensors()[k]).abs().max()) for k, v in one.tensors().items())
    assert moved > 1e-5  # two PPO steps moved the policy, so agreeing is not trivial
    assert diff <= 1e-6 and rows[2]["max_abs_diff"] == diff and rows[2]["identical"] is True
    for g, row in rows.items():  # step 2 is the one timed interval (step 1: warm-up; evaluations at the ends)
        hist = {h["step"]: h for h in map(json.loads, (runs / f"gpus{g}" / "metrics.jsonl").read_text().splitlines())}
        assert row["timed_steps"] == [2]
        assert row["step_s"] == pytest.approx(hist[2]["elapsed_sec"] - hist[1]["elapsed_sec"], abs=1e-3)
        assert "eval_reward" in hist[0] and "eval_reward" in hist[2] and "eval_reward" not in hist[1]
        assert (row["rollout_batch_size"], row["rloo_k"], row["reward"], row["gpu"]) == \
            (8, 4, "hps", "cpu" if g == 1 else "cpu (gloo)")
    assert rows[2]["speedup_vs_1gpu"] == pytest.approx(rows[1]["step_s"] / rows[2]["step_s"], rel=1e-3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA GPUs")
def test_missing_gpus_give_rows_that_say_so(tmp_path):
    proc, doc = _bench(tmp_path, "--device", "cuda", "--gpus", "1,2", timeout=120)
    assert proc.returncode == 1 and doc is not None and not doc["complete"]
    assert [(r["gpus"], r["ok"]) for r in doc["rows"]] == [(1, False), (2, False)]
    assert all("no GPU visible" in r["error"] for r in doc["rows"])
    assert not (tmp_path / "work" / "weights").exists()  # nothing written for runs that cannot happen
