"""``epd sample --gpus N``: seed sharding and point parallelism over N ranks (gloo processes on the CPU here) give
the same images, sidecars and summary as one process; impossible splits are refused before any rank starts."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from epd.cli import main
from epd.predictor import save
from epd.table import uniform_table
from _digits_study import tiny_digits_study  # the reliability suite's seconds-long digits backbone

SEEDS = "3-9"  # 7 seeds: an uneven split over 2 ranks


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tiny_digits_study(tmp_path_factory.mktemp("ranks"))
    for k in (2, 3):
        save(uniform_table(3, k, meta={"backbone": "digits", "afs": True}), root / f"k{k}")
    return root


def _sample(ws, out, *extra):
    argv = ["sample", "--config", str(ws / "config.yaml"), "--backbone", "d", "--weights", str(ws / "digits"),
            "--seeds", SEEDS, "--batch", "3", "--outdir", str(out), *map(str, extra)]
    return main(argv)


def _images(out: Path) -> dict:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(out.glob("0*.png"))}


def _sidecars(out: Path) -> dict:
    return {p.name: json.loads(p.read_text()) for p in sorted(out.glob("0*.json"))}


def _summary(out: Path) -> dict:
    s = json.loads((out / "summary.json").read_text())
    for k in ("seconds", "seconds_per_image", "machine"):  # timings, and the thread count in the machine label
        s.pop(k)
    return s


@pytest.mark.slow
def test_seed_sharding_equals_one_process(ws, tmp_path):
    assert _sample(ws, tmp_path / "one", "--solver", "dpmpp_2m", "--nfe", "4") == 0
    assert _sample(ws, tmp_path / "two", "--solver", "dpmpp_2m", "--nfe", "4", "--gpus", "2", "--device", "cpu") == 0
    one, two = _images(tmp_path / "one"), _images(tmp_path / "two")
    assert len(one) == 7 and one.keys() == two.keys()
    for name in one:
        np.testing.assert_array_equal(one[name], two[name], err_msg=name)
    assert _sidecars(tmp_path / "one") == _sidecars(tmp_path / "two")
    assert _summary(tmp_path / "one") == _summary(tmp_path / "two")


@pytest.mark.slow
def test_point_parallel_equals_one_process(ws, tmp_path):
    table = ws / "k2.safetensors"
    assert _sample(ws, tmp_path / "one", "--predictor_path", table) == 0
    assert _sample(ws, tmp_path / "pp", "--predictor_path", table, "--gpus", "2", "--parallel", "points") == 0
    one, pp = _images(tmp_path / "one"), _images(tmp_path / "pp")
    assert len(one) == 7 and one.keys() == pp.keys()
    for name in one:  # the same float32 arithmetic split over two processes: at most one 8-bit level apart
        assert np.abs(one[name].astype(int) - pp[name].astype(int)).max() <= 1, name
    assert _sidecars(tmp_path / "one") == _sidecars(tmp_path / "pp")


@pytest.mark.parametrize("extra, msg", [
    (["--gpus", "0", "--solver", "euler", "--nfe", "4"], "--gpus: must be >= 1"),
    (["--gpus", "2", "--parallel", "points", "--predictor_path", "k3.safetensors"], "K=3 points do not split"),
    (["--gpus", "2", "--parallel", "points", "--solver", "euler", "--nfe", "4"], "give --predictor_path"),
    (["--gpus", "2", "--device", "cuda", "--solver", "euler", "--nfe", "4"], "GPUs but"),
])
def test_impossible_splits_refused_before_any_rank(ws, tmp_path, capsys, extra, msg):
    extra = [str(ws / e) if e.endswith(".safetensors") else e for e in extra]
    assert _sample(ws, tmp_path / "bad", *extra) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
