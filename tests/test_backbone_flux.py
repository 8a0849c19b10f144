"""FLUX adapter: parity with diffusers' FluxPipeline on tiny random components (no downloads), the original's
and the official grids, embedded guidance, the fixture predictor, weights resolution and bad input."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

from _tiny_pipelines import (FloatTimestepDPM, flux_pipe as _pipe, misaligned as _misaligned, rel as _rel,  # noqa: E402
                             tiny_flux as _tiny)
from epd import predictor  # noqa: E402
from epd.backbones.base import Backbone  # noqa: E402
from epd.backbones.diffusers_common import CPU_ALIGNMENT  # noqa: E402
from epd.denoiser import Denoiser  # noqa: E402
from epd.flow_schedules import flux_sigmas  # noqa: E402
from epd.backbones.flux import SCHEDULER_CONFIG, FluxBackbone, pack_latents, unpack_latents  # noqa: E402
from epd.backbones.weights import MissingWeightsError  # noqa: E402
from epd.errors import ConfigError  # noqa: E402
from epd.solvers import solve  # noqa: E402

from _shared import FIXTURES as SHARED_FIXTURES, needs  # noqa: E402

FIXTURES = SHARED_FIXTURES / "rlepd" / "predictors"
PROMPTS = ["a cat", "a photo of an astronaut riding a horse"]
RES = 128  # tiny VAE with factor 8 -> 16x16 latent -> 64 packed tokens
MAX_SEQ = 16


@pytest.fixture(scope="module")
def parts():
    torch.set_num_threads(1)
    return _tiny()


def _backbone(parts, **cfg):
    tr, vae, tes, toks = parts
    return FluxBackbone.from_components(tr, vae, tes, toks, config={"resolution": RES, "max_sequence_length": MAX_SEQ,
                                                                     **cfg})


def _call(pipe, z, steps, **kw):
    out = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=3.5, latents=pack_latents(z.clone()), height=RES,
               width=RES, output_type="latent", max_sequence_length=MAX_SEQ, **kw).images
    return unpack_latents(out, *z.shape[-2:])


# ---------------------------------------------------------------------- parity with the pipeline
def test_euler_equals_flux_pipeline_official_grid(parts):
    bb = _backbone(parts)
    assert isinstance(bb, Backbone) and isinstance(bb.denoiser, Denoiser)
    z = bb.noise([1, 2])
    pipe = _pipe(parts, FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG))
    out = _call(pipe, z, 6)
    grid = pipe.scheduler.sigmas.double()
    assert torch.allclose(grid, bb.sigmas(7, "flowmatch_official"), atol=1e-6)
    res = solve("euler", bb.denoiser, z, grid, cond=bb.prepare(PROMPTS))
    assert _rel(res.x, out) <= 1e-4
    assert res.nfe == 6 and res.forward_passes == 6  # embedded guidance: no batch doubling


def test_original_grid_through_the_pipeline(parts):
    """The original's grid is the scheduler's own ``set_timesteps(N, mu)`` grid; FluxPipeline reaches it when given
    the unshifted ``linspace(1, 1/1000, N)`` as ``sigmas`` (and then takes one more step, to 0)."""
    bb = _backbone(parts)
    z = bb.noise([3, 4])
    pipe = _pipe(parts, FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG))
    states = []
    _call(pipe, z, None, sigmas=np.linspace(1.0, 1e-3, 9),
          callback_on_step_end=lambda p, i, t, kw: states.append(kw["latents"]) or {})
    grid = bb.sigmas(9)
    assert torch.allclose(pipe.scheduler.sigmas[:-1].double(), grid, atol=1e-6)
    res = solve("euler", bb.denoiser, z, grid, cond=bb.prepare(PROMPTS))
    assert _rel(res.x, unpack_latents(states[7], 16, 16)) <= 1e-4


def test_dpmpp_2m_in_edm_coordinates_equals_dpm_solver_pipeline(parts):
    bb = _backbone(parts, coords="edm")
    sig = bb.sigmas(8)  # flowmatch_dpm with mu from 64 tokens, EDM coordinates
    z = torch.stack([torch.randn(bb.latent_shape, generator=torch.Generator().manual_seed(s)) for s in (5, 6)])
    pipe = _pipe(parts, FloatTimestepDPM(use_flow_sigmas=True, prediction_type="flow_prediction",
                                         use_dynamic_shifting=True))
    out = _call(pipe, z, 7)
    t = pipe.scheduler.sigmas.double()
    assert torch.allclose(sig[:-1] / (1 + sig[:-1]), t[:-1], atol=1e-6)
    res = solve("dpmpp_2m", bb.denoiser, bb.noise([5, 6], sigma=float(sig[0])), sig, cond=bb.prepare(PROMPTS))
    assert _rel(res.x, out) <= 1e-4


def test_prepare_noise_guidance_and_decode(parts):
    bb = _backbone(parts)
    pipe = _pipe(parts, FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG))
    cond = bb.prepare(PROMPTS)
    emb, pooled, text_ids = pipe.encode_prompt(PROMPTS, None, device="cpu", max_sequence_length=MAX_SEQ)
    assert torch.equal(cond.tensors["embeds"], emb) and torch.equal(cond.tensors["pooled"], pooled)
    assert torch.equal(cond.extra["text_ids"], text_ids) and cond.repeat(3).extra["text_ids"] is cond.extra["text_ids"]
    gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
    packed, ids = pipe.prepare_latents(2, 16, RES, RES, torch.float32, "cpu", gens)
    assert torch.equal(bb.noise([11, 12]), unpack_latents(packed, 16, 16)) and bb.latent_shape == (16, 16, 16)
    seen = []
    h = bb.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    x = bb.noise([1, 2, 3, 4])  # 2 parallel points x 2 prompts in one call
    bb.denoiser(x, torch.full((4,), 0.5), cond)
    h.remove()
    assert seen[0]["hidden_states"].shape == (4, 64, 64) and torch.equal(seen[0]["guidance"], torch.full((4,), 3.5))
    assert torch.equal(seen[0]["img_ids"], ids)
    lat = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    cfg = pipe.vae.config
    img = pipe.image_processor.postprocess(pipe.vae.decode(lat / cfg.scaling_factor + cfg.shift_factor)[0], "pt")
    assert torch.allclose(bb.decode(lat), img, atol=1e-6)


def test_original_and_official_grids_are_both_named(parts):
    bb = _backbone(parts, resolution=1024)  # 4096 packed tokens -> mu 1.15
    assert bb.mu == pytest.approx(1.15)
    orig = bb.sigmas(9)  # default: the original's
    assert orig[1].item() == pytest.approx(0.956771, abs=1e-6) and orig[-1].item() == pytest.approx(0.003151, abs=1e-6)
    off = bb.sigmas(10, "flowmatch_official")  # FluxPipeline, 9 steps
    assert off[1].item() == pytest.approx(0.96193, abs=1e-5) and off[-1] == 0
    assert torch.equal(bb.sigmas(9, "flowmatch"), flux_sigmas(9, 1.15))


# ---------------------------------------------------------------------- fixture predictor
@needs("rlepd/predictors")
def test_fixture_predictor_samples(parts):
    pytest.importorskip("epd.legacy")
    table = predictor.load(FIXTURES / "fflux")
    tr, _, tes, toks = parts  # no VAE: factor 8 -> the original's 128x128 latent (4096 packed tokens)
    bb = FluxBackbone.from_components(tr, None, tes, toks, config={"resolution": 1024, "max_sequence_length": MAX_SEQ})
    grid = bb.table_grid(table)  # flowmatch with the table's mu = 1.15
    assert torch.allclose(grid, flux_sigmas(9, 1.15), atol=0)
    rows = []
    h = bb.transformer.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["hidden_states"].shape[0]),
                                                 with_kwargs=True)
    res = solve("epd", bb.denoiser, bb.noise([0]), grid, cond=bb.prepare(["a red car"]), table=table)
    h.remove()
    n, k = table.num_steps, table.num_points
    assert (n, k) == (9, 2)
    assert res.nfe == res.paper_nfe == 16 == k * (n - 1)  # spec §3.3: nominal NFE K (N - 1) = 16
    assert res.forward_passes == sum(rows) == (1 + k) * (n - 1) == 24  # "estimated model forwards"
    assert torch.isfinite(res.x).all() and res.x.shape == (1, 16, 128, 128)


@needs("rlepd/predictors")
def test_predictor_mismatch_is_refused(parts):
    pytest.importorskip("epd.legacy")
    with pytest.raises(ConfigError, match="made at 1024 px, backbone.resolution is 512"):
        _backbone(parts, resolution=512).check_table(predictor.load(FIXTURES / "fflux"))
    with pytest.raises(ConfigError, match="predictor is for 'sd15'"):
        _backbone(parts, resolution=1024).check_table(predictor.load(FIXTURES / "f15"))


# ---------------------------------------------------------------------- weights and bad input
def test_saved_folder_loads_through_env_var(parts, monkeypatch, tmp_path):
    for var in ("EPD_WEIGHTS_DIR", "HF_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("EPD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    folder = tmp_path / "FLUX.1-dev"
    monkeypatch.setenv("FLUX_MODEL_PATH", str(folder))
    with pytest.raises(MissingWeightsError, match=str(folder)):
        FluxBackbone.from_pretrained(None, config={"resolution": 512})
    _pipe(parts, FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)).save_pretrained(folder)
    loaded = FluxBackbone.from_pretrained(None, config={"resolution": 512, "max_sequence_length": MAX_SEQ})
    # No weight left as a misaligned view of the memory-mapped safetensors files (MKL's results can depend on
    # operand alignment; see epd.backbones.diffusers_common.own_cpu_weights).
    assert not _misaligned(loaded.pipe)
    ref = _backbone(parts, resolution=512)
    x, s = loaded.noise([1]), torch.tensor([0.6])
    assert torch.equal(loaded.denoiser(x, s, loaded.prepare(["a cat"])), ref.denoiser(x, s, ref.prepare(["a cat"])))
    # A workflow section (epd.backbones.load_backbone): study keys ignored, adapter settings in backend_config;
    # bfloat16 weights, float32 solver state.
    from epd.backbones import load_backbone
    from epd.backbones.flux import check

    section = {"kind": "flux", "name": "flux_dev", "guidance": 3.5, "resolution": 512, "model_path": str(folder),
               "solvers": ["euler"], "nfes": [8], "metrics": ["hps"],
               "backend_config": {"max_sequence_length": MAX_SEQ, "dtype": "bfloat16"}}
    assert check(section) == folder
    bf = load_backbone(section, device="cpu")
    assert bf.transformer.dtype == torch.bfloat16 and bf.settings["guidance_scale"] == 3.5
    d_bf = bf.denoiser(x, s, bf.prepare(["a cat"]))
    d_32 = ref.denoiser(x, s, ref.prepare(["a cat"]))
    assert d_bf.dtype == torch.float32 and 0 < _rel(d_bf, d_32) < 3e-2
    with pytest.raises(ConfigError, match="offload: 'model' CPU offload needs a CUDA device"):
        load_backbone({**section, "backend_config": {"offload": "model"}}, device="cpu")
    # FLUX.1-schnell-like weights (no guidance embedding) are refused before loading.
    cfg = json.loads((folder / "transformer" / "config.json").read_text())
    (folder / "transformer" / "config.json").write_text(json.dumps({**cfg, "guidance_embeds": False}))
    with pytest.raises(ConfigError, match="no guidance embedding"):
        FluxBackbone.from_pretrained(None, config={"resolution": 512})
    # A folder of another pipeline is refused.
    idx = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**idx, "_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(ConfigError, match="StableDiffusion3Pipeline, but backbone 'flux' needs a FluxPipeline"):
        FluxBackbone.from_pretrained(None, config={"resolution": 512})


def test_bad_input(parts):
    with pytest.raises(ConfigError, match="negative prompt"):
        _backbone(parts, negative_prompt="blurry")
    with pytest.raises(ConfigError, match="negative prompt"):
        _backbone(parts).prepare(["a cat"], negative_prompt="blurry")
    long = " ".join(["astronaut"] * 40)
    with pytest.warns(UserWarning, match="T5 \\(max_sequence_length\\) limit of 16"):
        cond = _backbone(parts).prepare([long])
    assert cond.tensors["embeds"].shape[1] == MAX_SEQ
    with pytest.raises(ConfigError, match="multiple of 16"):
        _backbone(parts, resolution=136)
    with pytest.raises(ConfigError, match="resolution: FLUX.1-dev runs at"):
        FluxBackbone.from_pretrained(None, config={"resolution": 768})
    # The original's backend_config keys (absolute cluster paths included) are accepted as aliases.
    bb = _backbone(parts, torch_dtype="float32", enable_model_cpu_offload=False, flowmatch_mu=1.15,
                   latent_resolution=128, sigma_min=0.001, sigma_max=1.0)
    assert bb.mu == 1.15
