"""SD3 adapter: parity with diffusers' StableDiffusion3Pipeline on tiny random components (no downloads),
the original's grid, fixture predictors, weights resolution and bad input."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

from _tiny_pipelines import (FloatTimestepDPM, misaligned as _misaligned, rel as _rel, sd3_pipe as _pipe,  # noqa: E402
                             tiny_sd3 as _tiny)
from epd import predictor  # noqa: E402
from epd.backbones.base import Backbone  # noqa: E402
from epd.backbones.diffusers_common import CPU_ALIGNMENT  # noqa: E402
from epd.denoiser import Denoiser  # noqa: E402
from epd.flow_schedules import sd3_sigmas  # noqa: E402
from epd.backbones.sd3 import SCHEDULER_CONFIG, SD3Backbone  # noqa: E402
from epd.backbones.weights import MissingWeightsError  # noqa: E402
from epd.errors import ConfigError  # noqa: E402
from epd.solvers import solve  # noqa: E402

from _shared import FIXTURES as SHARED_FIXTURES, needs  # noqa: E402

FIXTURES = SHARED_FIXTURES / "rlepd" / "predictors"
PROMPTS = ["a cat", "a photo of an astronaut riding a horse"]
RES = 128  # tiny VAE with factor 8 -> 16x16 latent, 8x8 patches
MAX_SEQ = 16


@pytest.fixture(scope="module")
def parts():
    torch.set_num_threads(1)
    return _tiny()


def _backbone(parts, **cfg):
    tr, vae, tes, toks = parts
    return SD3Backbone.from_components(tr, vae, tes, toks, config={"resolution": RES, "max_sequence_length": MAX_SEQ,
                                                                    **cfg})


def _call(pipe, z, steps, **kw):
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=4.5, latents=z.clone(), output_type="latent",
                height=RES, width=RES, max_sequence_length=MAX_SEQ, **kw).images


# ---------------------------------------------------------------------- parity with the pipeline
def test_euler_equals_flow_match_pipeline(parts):
    bb = _backbone(parts)
    assert isinstance(bb, Backbone) and isinstance(bb.denoiser, Denoiser)
    z = bb.noise([1, 2])
    pipe = _pipe(parts, FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG))
    out = _call(pipe, z, 6)
    grid = pipe.scheduler.sigmas.double()
    assert torch.allclose(grid, bb.sigmas(7, "flowmatch_official"), atol=1e-6)
    res = solve("euler", bb.denoiser, z, grid, cond=bb.prepare(PROMPTS))
    assert _rel(res.x, out) <= 1e-4
    assert res.nfe == 6 and res.forward_passes == 12  # CFG doubling counted


def test_original_grid_through_the_pipeline(parts):
    """The original's N=11 grid (ends at t=0.008929) is the pipeline's 11-step grid minus the final step to 0."""
    bb = _backbone(parts)
    z = bb.noise([3, 4])
    pipe = _pipe(parts, FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG))
    states = []
    _call(pipe, z, 11, callback_on_step_end=lambda p, i, t, kw: states.append(kw["latents"]) or {})
    grid = bb.sigmas(11)  # flowmatch
    assert torch.allclose(pipe.scheduler.sigmas[:-1].double(), grid, atol=1e-6)
    res = solve("euler", bb.denoiser, z, grid, cond=bb.prepare(PROMPTS))
    assert _rel(res.x, states[9]) <= 1e-4


def test_dpmpp_2m_in_edm_coordinates_equals_dpm_solver_pipeline(parts):
    bb = _backbone(parts, coords="edm")
    z = torch.stack([torch.randn(bb.latent_shape, generator=torch.Generator().manual_seed(s)) for s in (5, 6)])
    sched = FloatTimestepDPM(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    pipe = _pipe(parts, sched)
    out = _call(pipe, z, 7)
    t = pipe.scheduler.sigmas.double()
    sig = bb.sigmas(8)  # flowmatch_dpm in EDM coordinates
    assert torch.allclose(sig[:-1] / (1 + sig[:-1]), t[:-1], atol=1e-6) and sig[-1] == 0
    x0 = bb.noise([5, 6], sigma=float(sig[0]))
    # The flow state z at t0, in EDM coordinates (1 / (1 - t0) with t0 = 0.9997 amplifies float32 rounding of t0).
    assert torch.allclose(x0, z / (1 - t[0]).float(), rtol=1e-3)
    res = solve("dpmpp_2m", bb.denoiser, x0, sig, cond=bb.prepare(PROMPTS))
    assert _rel(res.x, out) <= 1e-4  # at sigma = 0 the EDM state is the flow state


def test_prepare_noise_and_decode_match_the_pipeline(parts):
    bb = _backbone(parts, negative_prompt="blurry")
    pipe = _pipe(parts, FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG))
    cond = bb.prepare(PROMPTS)
    ref = pipe.encode_prompt(PROMPTS, None, None, device="cpu", negative_prompt=["blurry"] * 2,
                             max_sequence_length=MAX_SEQ)
    for name, r in zip(("embeds", "neg_embeds", "pooled", "neg_pooled"), ref):
        assert torch.equal(cond.tensors[name], r), name
    gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
    assert torch.equal(bb.noise([11, 12]), pipe.prepare_latents(2, 4, RES, RES, torch.float32, "cpu", gens))
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cfg = pipe.vae.config
    img = pipe.image_processor.postprocess(pipe.vae.decode(x / cfg.scaling_factor + cfg.shift_factor)[0], "pt")
    assert torch.allclose(bb.decode(x), img, atol=1e-6) and img.shape == (2, 3, RES, RES)


def test_flow_and_edm_coordinates_give_the_same_first_order_steps(parts):
    flow, edm = _backbone(parts), _backbone(parts, coords="edm")
    cond = flow.prepare(PROMPTS)
    t = sd3_sigmas(6, schedule="flowmatch_dpm")
    z = flow.noise([7, 8])
    a = solve("euler", flow.denoiser, z, t, cond=cond).x
    b = solve("euler", edm.denoiser, z / (1 - t[0]).float(), t / (1 - t).clamp_min(1e-12) * (t > 0), cond=cond).x
    assert _rel(b, a) <= 5e-5  # float32; the EDM state is the flow state times 1 / (1 - t)


# ---------------------------------------------------------------------- fixture predictors
@needs("rlepd/predictors")
@pytest.mark.parametrize("name,res", [("f512", 512), ("f1024", 1024)])
def test_fixture_predictor_samples(parts, name, res):
    pytest.importorskip("epd.legacy")
    table = predictor.load(FIXTURES / name)
    tr, _, tes, toks = parts  # no VAE: factor 8 gives the original's 16 x (res/8)^2 latent shape (here 4 channels)
    bb = SD3Backbone.from_components(tr, None, tes, toks, config={"resolution": res, "max_sequence_length": MAX_SEQ})
    grid = bb.table_grid(table)
    assert torch.allclose(grid, sd3_sigmas(11), atol=0) and grid[-1].item() == pytest.approx(0.008929, abs=1e-6)
    cond = bb.prepare(["a red car"])
    rows, text_calls = [], []
    h = bb.transformer.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["hidden_states"].shape[0]),
                                                 with_kwargs=True)
    hooks = [te.register_forward_pre_hook(lambda m, a: text_calls.append(1)) for te in tes]
    res_ = solve("epd", bb.denoiser, bb.noise([0]), grid, cond=cond, table=table)
    for hk in (h, *hooks):
        hk.remove()
    assert not text_calls  # embeddings computed once, in prepare()
    n, k = table.num_steps, table.num_points
    assert (n, k) == (11, 2) and res_.nfe == res_.paper_nfe == 20
    assert res_.forward_passes == sum(rows) == 2 * (1 + k) * (n - 1)
    assert torch.isfinite(res_.x).all() and res_.x.shape == (1, 4, res // 8, res // 8)


@needs("rlepd/predictors")
def test_predictor_mismatch_is_refused(parts):
    pytest.importorskip("epd.legacy")
    bb = _backbone(parts, resolution=1024)
    with pytest.raises(ConfigError, match="resolution: predictor was made at 512 px, backbone.resolution is 1024"):
        bb.table_grid(predictor.load(FIXTURES / "f512"))
    with pytest.raises(ConfigError, match="predictor is for 'flux'"):
        bb.check_table(predictor.load(FIXTURES / "fflux"))
    with pytest.raises(ConfigError, match="coords"):
        _backbone(parts, resolution=1024, coords="edm").check_table(predictor.load(FIXTURES / "f1024"))
    bb.check_table(predictor.load(FIXTURES / "f1024"))


# ---------------------------------------------------------------------- weights and bad input
def test_saved_folder_loads_through_epd_weights_dir(parts, monkeypatch, tmp_path):
    for var in ("SD3_MODEL_PATH", "HF_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("EPD_WEIGHTS_DIR", str(tmp_path / "w"))
    monkeypatch.setenv("EPD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(MissingWeightsError, match="SD3_MODEL_PATH"):
        SD3Backbone.from_pretrained(None, config={"resolution": 512})
    pipe = _pipe(parts, FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG))
    pipe.save_pretrained(tmp_path / "w" / "sd3-medium")
    loaded = SD3Backbone.from_pretrained(None, config={"resolution": 512, "max_sequence_length": MAX_SEQ})
    # The loaded weights sit where the in-memory ones do: MKL's results can depend on operand alignment (see
    # epd.backbones.diffusers_common.own_cpu_weights and test_saved_folder_parity_on_mkl_sse42_kernels).
    assert not _misaligned(loaded.pipe)
    ref = _backbone(parts, resolution=512)
    x, s = loaded.noise([1]), torch.tensor([0.6])
    assert torch.equal(loaded.denoiser(x, s, loaded.prepare(["a cat"])), ref.denoiser(x, s, ref.prepare(["a cat"])))
    with pytest.raises(ConfigError, match="resolution: SD3-Medium runs at"):
        SD3Backbone.from_pretrained(None, config={"resolution": 768})


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkl.is_available(),
                    reason="MKL_ENABLE_INSTRUCTIONS needs torch built with MKL on x86-64")
def test_saved_folder_parity_on_mkl_sse42_kernels():
    """The saved-folder tests of SD3 and FLUX again, with MKL on its SSE4.2 kernels (what it runs on CPUs without
    AVX2). Their sgemv results depend on operand alignment, so weights left as views of the memory-mapped
    safetensors files (a 64-byte-misaligned CLIP ``text_projection.weight``) changed the pooled embeddings in the
    last bit. MKL reads the setting at start, hence a fresh process."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/test_backbone_sd3.py::test_saved_folder_loads_through_epd_weights_dir",
                        "tests/test_backbone_flux.py::test_saved_folder_loads_through_env_var"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_bad_input(parts):
    long = " ".join(["astronaut"] * 40)
    with pytest.warns(UserWarning, match="T5"):
        _backbone(parts).prepare([long])
    with pytest.raises(ConfigError, match="no finite EDM noise level"):
        _backbone(parts, coords="edm").sigmas(11, "flowmatch")
    with pytest.raises(ConfigError, match="backbone.schedule"):
        _backbone(parts, schedule="discrete")
    with pytest.raises(ConfigError, match="multiple of 16"):
        _backbone(parts, resolution=120)
    with pytest.raises(ConfigError, match="backbone.mu: unknown setting"):
        _backbone(parts, mu=1.0)
    with pytest.raises(ConfigError, match="prepare_embeds"):
        tr, vae, _, _ = parts
        SD3Backbone.from_components(tr, vae, config={"resolution": RES}).prepare(["a cat"])


def test_latency_benchmark_tiny_mode_writes_the_records_interface(tmp_path):
    """benchmarks/backbone_latency.py --tiny (CPU): one row per backbone, resolution and K with the GPU-records keys
    and the forward-pass counts of an EPD sample (N=11 with CFG, N=9 without)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import backbone_latency

    out = tmp_path / "latency.json"
    backbone_latency.main(["--tiny", "--cases", "sd15:64,sd3:64,flux:64", "--ks", "1,3", "--repeats", "1",
                           "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["complete"] and [(r["backbone"], r["K"]) for r in doc["rows"]] == [
        ("sd15", 1), ("sd15", 3), ("sd3", 1), ("sd3", 3), ("flux", 1), ("flux", 3)]
    for r in doc["rows"]:
        assert {"backbone", "resolution", "K", "peak_memory_gb", "step_ms", "gpu"} <= r.keys() and r["error"] is None
        n, cfg = (9, 1) if r["backbone"] == "flux" else (11, 2)
        assert r["num_points"] == n and r["forward_passes"] == cfg * (1 + r["K"]) * (n - 1)
        assert len(r["step_ms_all"]) == n - 1 and r["step_ms"] > 0
