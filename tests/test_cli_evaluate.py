"""`epd evaluate` on a folder `epd sample --grid` wrote (a tiny trained digits backbone): the grid sheet is skipped
and the scores equal those of the same images without it; a missing weights folder is named by its flag
(`--weights-dir`); each result is printed once; a folder without sidecars is told how to sample per image."""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _digits_study import tiny_digits_study

from epd.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """(weights folder, a folder sampled with --grid)."""
    root = tiny_digits_study(tmp_path_factory.mktemp("grid"))
    assert main(["sample", "--config", str(root / "config.yaml"), "--backbone", "d", "--weights", str(root / "digits"),
                 "--solver", "euler", "--nfe", "4", "--seeds", "0-11", "--batch", "6", "--grid",
                 "--out", str(root / "s")]) == 0
    assert (root / "s" / "grid.png").is_file()
    return root / "digits", root / "s"


def _scores(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_grid_folder_scores_like_the_images_alone(sampled, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    weights, folder = sampled
    plain = tmp_path / "plain"
    shutil.copytree(folder, plain)
    (plain / "grid.png").unlink()
    for src, out in ((folder, tmp_path / "e1"), (plain, tmp_path / "e2")):
        assert main(["evaluate", "--images", str(src), "--metrics", "digits_alignment,digits_accuracy",
                     "--weights-dir", str(weights), "--device", "cpu", "--out", str(out)]) == 0
    a, b = _scores(tmp_path / "e1" / "scores.csv"), _scores(tmp_path / "e2" / "scores.csv")
    assert len(a) == 12 and a == b and "grid.png" not in {r["image"] for r in a}


def test_missing_weights_folder_names_the_flag(sampled, tmp_path, capsys):
    _, folder = sampled
    assert main(["evaluate", "--images", str(folder), "--metrics", "digits_alignment", "--device", "cpu",
                 "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "--weights-dir" in err and "weights_dir" not in err
    assert not (tmp_path / "e").exists()


def test_folder_without_sidecars_says_how_to_sample(sampled, tmp_path, capsys):
    weights, folder = sampled
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(folder / "000000.png", bare / "000000.png")
    assert main(["evaluate", "--images", str(bare), "--metrics", "digits_alignment", "--weights-dir", str(weights),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "epd sample --config" in err and "--out DIR" in err and "sidecar" in err


def test_results_are_printed_once(sampled, tmp_path):
    weights, folder = sampled
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    r = subprocess.run([sys.executable, "-m", "epd.cli", "evaluate", "--images", str(folder), "--metrics",
                        "digits_alignment,digits_accuracy", "--weights-dir", str(weights), "--device", "cpu",
                        "--out", str(tmp_path / "e")], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    both = r.stdout + r.stderr
    for name in ("digits_alignment", "digits_accuracy"):
        assert sum(ln.startswith(f"{name}: ") or f" {name}: " in ln for ln in both.splitlines()) == 1, both
