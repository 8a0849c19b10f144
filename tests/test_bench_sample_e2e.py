"""``benchmarks/gpu_sample_e2e.py --tiny``: the end-to-end comparison runs ``epd sample``'s path and diffusers'
pipeline on the same toy modules, equal NFE and grid, and both produce the same latents and images (float32, CPU)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_sample_e2e.py"
KEYS = ("backbone", "resolution", "gpus", "gpu", "driver", "torch", "diffusers", "dtype", "batch", "nfe", "solver",
        "ours_images_per_s", "ours_eager_images_per_s", "diffusers_images_per_s", "throughput_vs_diffusers",
        "eager_throughput_vs_diffusers", "includes", "rel_diff_vs_diffusers", "latent_rel_diff_vs_diffusers",
        "graphed", "capture_error")


def _load():
    spec = importlib.util.spec_from_file_location("gpu_sample_e2e", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _load()


@pytest.fixture(scope="module")
def doc(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "e2e.json"
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()
    rc = bench.main(["--tiny", "--out", str(out), "--cases", "sd15:64,sd3:64,flux:128", "--batches", "1,2",
                     "--repeats", "1"])
    # the run leaves the process as it found it
    assert rc == 0 and torch.get_num_threads() == threads and torch.is_grad_enabled() == grad
    return json.loads(out.read_text())


def test_rows_have_the_interface_keys_and_consistent_ratios(doc):
    assert doc["benchmark"] == "gpu_sample_e2e" and doc["complete"] is True and doc["nfe"] == 10
    rows = doc["rows"]
    assert [(r["backbone"], r["resolution"], r.get("batch")) for r in rows] == [
        ("sd15", 64, 1), ("sd15", 64, 2), ("sd3", 64, 1), ("sd3", 64, 2), ("flux", 128, 1), ("flux", 128, 2)]
    for r in rows:
        assert "error" not in r, r.get("error")
        assert set(KEYS) <= set(r)
        for k in ("ours", "ours_eager", "diffusers"):
            v = r[f"{k}_images_per_s"]
            assert math.isfinite(v) and v > 0
            # images/s is the batch over the median wall time
            assert v == pytest.approx(r["batch"] / (r[f"{k}_ms"]["median_ms"] / 1e3), rel=1e-3)
        assert r["throughput_vs_diffusers"] == pytest.approx(r["ours_images_per_s"] / r["diffusers_images_per_s"])
        assert r["eager_throughput_vs_diffusers"] == pytest.approx(
            r["ours_eager_images_per_s"] / r["diffusers_images_per_s"])
        assert r["gpus"] == 1 and r["dtype"] == "float32" and r["solver"] == "euler"
        assert r["graphed"] is False and "CPU" in r["capture_error"]  # no CUDA graphs on the CPU


def test_equal_nfe_and_grid_on_both_sides(doc):
    cfg_doubling = {"sd15": 2, "sd3": 2, "flux": 1}
    for r in doc["rows"]:
        assert r["nfe"] == r["ours_nfe"] == r["diffusers_network_calls"] == 10
        assert r["ours_forward_passes"] == 10 * cfg_doubling[r["backbone"]]
        assert r["grid_points"] == 11 and r["grid_rel_diff"] < 1e-5  # ours == the scheduler's 10-step grid
    sched = {r["backbone"]: (r["schedule"], r["scheduler"]) for r in doc["rows"]}
    assert sched == {"sd15": ("leading", "DDIMScheduler"),
                     "sd3": ("flowmatch_official", "FlowMatchEulerDiscreteScheduler"),
                     "flux": ("flowmatch_official", "FlowMatchEulerDiscreteScheduler")}


def test_ours_and_diffusers_make_the_same_images(doc):
    for r in doc["rows"]:
        assert r["latent_rel_diff_vs_diffusers"] < 1e-5, r["backbone"]
        # SD1.5 decodes the EDM state, DDIM the VP state (factor sqrt(abar_0) = 0.99957): still < 1e-4 here
        assert r["rel_diff_vs_diffusers"] < 1e-4 and r["eager_rel_diff_vs_diffusers"] < 1e-4, r["backbone"]
        assert r["graphed_vs_eager_rel_diff"] == 0.0 and r["diffusers_finite"]


def test_start_latents_are_our_noise_in_the_pipeline_coordinates(bench):
    """The pipeline's ``latents=``: SD1.5 EDM noise -> VP at the first grid point, FLUX packed, SD3 as is."""

    class BB:
        latent_shape = (4, 4, 4)

        def noise(self, seeds):
            return torch.stack([torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(s))
                                for s in seeds]) * 3.0

    z = BB().noise([1, 2])
    assert torch.equal(bench.pipeline_latents("sd3", BB(), [1, 2], 1.0, torch.float32), z)
    assert torch.allclose(bench.pipeline_latents("sd15", BB(), [1, 2], 0.25, torch.float32), z * 0.25)
    packed = bench.pipeline_latents("flux", BB(), [1, 2], 1.0, torch.float32)
    assert packed.shape == (2, 4, 16) and torch.equal(packed[0, 0].reshape(4, 2, 2), z[0, :, :2, :2])


@pytest.mark.parametrize("argv,msg", [(["--cases", "sdxl:512"], "--cases"), (["--cases", "sd3"], "--cases"),
                                      (["--batches", "0"], "--batches"), (["--warmup", "0"], "--warmup")])
def test_bad_arguments_are_refused(bench, tmp_path, capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        bench.main(["--tiny", "--out", str(tmp_path / "x.json"), *argv])
    assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
