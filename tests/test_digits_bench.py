"""``epd bench backbone`` on a tiny budget: report keys, equal FD sample counts, NFE accounting, bad config."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from epd.bench.backbone import run_bench
from epd.cli import main as cli_main
from epd.errors import ConfigError

TINY_TRAIN = {"steps": 4, "batch_size": 16, "warmup": 1, "arch": {"channels": 8, "emb_dim": 16},
              "classifier": {"steps": 20, "hidden": [16, 8]}}
TINY_BENCH = {"samples_per_class": 3, "teacher_steps": 4, "solvers": ["euler", "heun", "ipndm"], "nfes": [4, 5],
              "guidance_sweep": [0.0, 2.0], "sweep_samples_per_class": 1, "sweep_steps": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp_path, bench=TINY_BENCH, guidance=1.5):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"backbones": {"digits": {"kind": "digits", "guidance": guidance,
                                                          "train": TINY_TRAIN, "bench": bench}}}))
    return p


def test_bench_report(tmp_path):
    out = tmp_path / "r.json"
    assert cli_main(["bench", "backbone", "--config", str(_config(tmp_path)), "--out", str(out),
                     "--workdir", str(tmp_path / "w")]) == 0
    r = json.loads(out.read_text())
    for key in ("train_minutes", "teacher_accuracy", "teacher_fd", "real_fd_train_vs_heldout", "euler_nfe5_fd"):
        assert key in r
    assert r["euler_nfe5_fd"] == next(b["fd"] for b in r["baselines"] if b["solver"] == "euler" and b["nfe"] == 5)
    assert r["n_samples"] == 30 and r["fd_counts"]["generated_or_train_subset"] == 30
    assert r["teacher"]["nfe"] == 8 and r["teacher"]["forward_passes"] == 16  # CFG 1.5 doubles the batch
    rows = {(b["solver"], b["nfe"]): b for b in r["baselines"]}
    assert set(rows) == {(s, n) for s in ("euler", "heun", "ipndm") for n in (4, 5)}
    assert rows[("heun", 5)]["final_step_to_zero"] and rows[("heun", 5)]["grid_points"] == 3  # 2 Heun + 1 Euler
    assert not rows[("heun", 4)]["final_step_to_zero"] and rows[("heun", 4)]["grid_points"] == 3
    assert rows[("euler", 5)]["grid_points"] == 6 and rows[("euler", 5)]["forward_passes"] == 10
    assert all(0 <= b["accuracy"] <= 1 and b["rmse_vs_teacher"] > 0 for b in r["baselines"])
    assert set(r["guidance_sweep"]["scales"]) == {"0.0", "2.0"}
    assert r["machine_start"]["cpu_count"] >= 1 and r["checks"]["train_under_10_min"] is True
    again = run_bench(_config(tmp_path), tmp_path / "r2.json", weights=tmp_path / "w")
    assert again["train_minutes"] is None
    assert again["teacher_samples_sha256"] == r["teacher_samples_sha256"]
    assert again["teacher_fd"] == r["teacher_fd"]


def test_bench_rejects_unequal_counts_and_unknown_keys(tmp_path):
    with pytest.raises(ConfigError, match="exceed the 1500 train digits"):
        run_bench(_config(tmp_path, {**TINY_BENCH, "samples_per_class": 151}), tmp_path / "r.json",
                  workdir=tmp_path / "w")
    with pytest.raises(ConfigError, match=r"backbones\.digits\.bench\.nfe: unknown key"):
        run_bench(_config(tmp_path, {"nfe": [5]}), tmp_path / "r.json", workdir=tmp_path / "w")
    assert not (tmp_path / "r.json").exists()
