"""SD1.5 adapter: parity with diffusers' StableDiffusionPipeline on tiny random components (no downloads),
the original's discrete grid and UNet time input, fixture predictors, weights resolution and bad input."""

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler,  # noqa: E402
                       StableDiffusionPipeline)

from _tiny_pipelines import rel as _rel, sd15_pipe as _pipe, tiny_sd15 as _tiny  # noqa: E402
from epd import predictor  # noqa: E402
from epd.backbones.base import Backbone  # noqa: E402
from epd.denoiser import Denoiser  # noqa: E402
from epd.backbones.sd15 import SCHEDULER_CONFIG, SD15Backbone  # noqa: E402
from epd.backbones.weights import MissingWeightsError  # noqa: E402
from epd.errors import ConfigError  # noqa: E402
from epd.solvers import solve  # noqa: E402

from _shared import FIXTURES as SHARED_FIXTURES, needs  # noqa: E402

FIXTURES = SHARED_FIXTURES / "rlepd" / "predictors"
PROMPTS = ["a cat", "a photo of an astronaut riding a horse"]
# spec §2: the original's discrete grid (scaled-linear SD1.5 table)
SD15_N10 = [14.6146, 7.8399, 4.6092, 2.9183, 1.9502, 1.3449, 0.9324, 0.6250, 0.3687, 0.0292]
SD15_N11 = [14.61464, 8.30717, 5.09241, 3.32507, 2.27973, 1.61558, 1.16287, 0.83188, 0.57119, 0.34371, 0.02917]


@pytest.fixture(scope="module")
def parts():
    torch.set_num_threads(1)
    return _tiny()


def _backbone(parts, **cfg):
    unet, vae, te, tok = parts
    return SD15Backbone.from_components(unet, vae, te, tok, config={"resolution": 32, **cfg})


# ---------------------------------------------------------------------- grid and time input
def test_discrete_grid_reproduces_the_original_vectors(parts):
    bb = _backbone(parts)
    assert torch.allclose(bb.sigmas(10), torch.tensor(SD15_N10, dtype=torch.float64), rtol=0, atol=5e-5)
    assert torch.allclose(bb.sigmas(11), torch.tensor(SD15_N11, dtype=torch.float64), rtol=0, atol=5e-6)
    assert bb.sigma_min == pytest.approx(0.029167, rel=1e-4) and bb.sigma_max == pytest.approx(14.614641, rel=1e-5)


def test_unet_time_input_modes(parts):
    bb = _backbone(parts)
    ac = bb.alphas_cumprod
    table = ((1 - ac) / ac).sqrt()
    idx = torch.tensor([0, 1, 17, 500, 998, 999])
    # On the table's own sigmas the original's continuous VP time gives the integer index.
    assert torch.allclose(bb.denoiser.timestep(table[idx]), idx.double(), atol=1e-6)
    grid = bb.sigmas(11)
    tau = bb.denoiser.timestep(grid)
    assert torch.allclose(tau, 1000 * torch.linspace(1, 1e-3, 11, dtype=torch.float64) - 1, atol=1e-6)
    disc = SD15Backbone.from_components(*parts, config={"resolution": 32, "timestep_mode": "discrete"})
    assert torch.equal(disc.denoiser.timestep(grid), tau.round())
    # log_sigma = diffusers' EulerDiscreteScheduler._sigma_to_t
    ls = SD15Backbone.from_components(*parts, config={"resolution": 32, "timestep_mode": "log_sigma"})
    euler = EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
    ref = euler._sigma_to_t(grid.numpy(), torch.log(table).numpy())
    assert torch.allclose(ls.denoiser.timestep(grid), torch.as_tensor(ref, dtype=torch.float64), atol=1e-4)


def test_leading_and_trailing_grids_are_diffusers_ddim(parts):
    bb = _backbone(parts)
    for spacing in ("leading", "trailing"):
        ddim = DDIMScheduler.from_config({**SCHEDULER_CONFIG, "timestep_spacing": spacing})
        ddim.set_timesteps(10)
        ac = ddim.alphas_cumprod.double()
        ref = [((1 - ac[t]) / ac[t]).sqrt() for t in ddim.timesteps] + [((1 - ac[0]) / ac[0]).sqrt()]
        # diffusers' float32 cumprod vs the original's float64 one: up to 1.3e-5 relative at the smallest sigma
        assert torch.allclose(bb.sigmas(11, spacing), torch.stack(ref), rtol=2e-5)


# ---------------------------------------------------------------------- parity with the pipeline
def _run_pipe(parts, scheduler, z, steps, **kw):
    pipe = _pipe(parts, scheduler)
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=7.5, latents=z.clone(), output_type="latent",
                **kw).images, pipe.scheduler


@pytest.mark.parametrize("mode", ["discrete", "continuous"])
def test_euler_equals_ddim_pipeline(parts, mode):
    bb = _backbone(parts, timestep_mode=mode)
    z = bb.noise([3, 4]) / bb.sigma_max
    out, sched = _run_pipe(parts, DDIMScheduler.from_config(SCHEDULER_CONFIG), z, 8)
    sig = bb.sigmas(9, "leading")  # DDIM's timesteps, then the final alpha (set_alpha_to_one=False)
    ac = sched.alphas_cumprod.double()
    assert torch.allclose(sig[:-1], ((1 - ac[sched.timesteps]) / ac[sched.timesteps]).sqrt(), rtol=2e-5)
    res = solve("euler", bb.denoiser, z * (1 + sig[0] ** 2).sqrt().float(), sig, cond=bb.prepare(PROMPTS))
    ref = out / ac[0].sqrt().float()  # DDIM ends in VP coordinates at abar_0
    assert _rel(res.x, ref) <= 1e-4
    assert res.nfe == 8 and res.forward_passes == 16


def test_euler_equals_euler_discrete_pipeline(parts):
    bb = _backbone(parts, timestep_mode="discrete")
    z = bb.noise([5, 6]) / bb.sigma_max
    sched = EulerDiscreteScheduler.from_config({**SCHEDULER_CONFIG, "timestep_spacing": "leading"})
    out, sched = _run_pipe(parts, sched, z, 7)
    sig = sched.sigmas.double()  # leading integer timesteps + terminal 0
    res = solve("euler", bb.denoiser, z * sched.init_noise_sigma, sig, cond=bb.prepare(PROMPTS))
    assert _rel(res.x, out) <= 1e-4


def test_original_grid_through_diffusers_euler(parts):
    """The original's continuous N=11 grid, passed to diffusers as custom sigmas (the UNet then sees diffusers'
    log-sigma timesteps, our ``log_sigma`` mode)."""
    bb = _backbone(parts, timestep_mode="log_sigma")
    grid = bb.sigmas(11)
    z = bb.noise([7, 8]) / bb.sigma_max
    sched = EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
    out, sched = _run_pipe(parts, sched, z, None, sigmas=grid.tolist())
    assert torch.allclose(sched.sigmas.double(), grid, rtol=1e-6)  # float32 copy of our grid
    res = solve("euler", bb.denoiser, z * sched.init_noise_sigma, grid, cond=bb.prepare(PROMPTS))
    assert _rel(res.x, out) <= 1e-4


def test_dpmpp_2m_equals_dpm_solver_pipeline(parts):
    bb = _backbone(parts, timestep_mode="discrete")
    z = bb.noise([9, 10]) / bb.sigma_max
    out, sched = _run_pipe(parts, DPMSolverMultistepScheduler.from_config(SCHEDULER_CONFIG), z, 8)
    sig = sched.sigmas.double()
    res = solve("dpmpp_2m", bb.denoiser, z * (1 + sig[0] ** 2).sqrt().float(), sig, cond=bb.prepare(PROMPTS))
    assert _rel(res.x, out) <= 1e-4


def test_prepare_noise_and_decode_match_the_pipeline(parts):
    bb = _backbone(parts)
    pipe = _pipe(parts, PNDMScheduler.from_config(SCHEDULER_CONFIG))
    cond = bb.prepare(PROMPTS)
    emb, neg = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=["", ""])
    assert torch.equal(cond.tensors["cond"], emb) and torch.equal(cond.tensors["uncond"], neg)
    # Seeds -> the pipeline's latents with one CPU generator per image, scaled by sigma_max (the original's x_T).
    gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
    lat = pipe.prepare_latents(2, 4, 32, 32, torch.float32, "cpu", gens)
    assert torch.equal(bb.noise([11, 12]), lat * bb.sigma_max)
    assert torch.equal(bb.noise([11, 12]), bb.noise([11, 12]))
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    img = pipe.image_processor.postprocess(pipe.vae.decode(x / pipe.vae.config.scaling_factor)[0], output_type="pt")
    assert torch.allclose(bb.decode(x), img, atol=1e-6)
    assert bb.decode(x).shape == (2, 3, 32, 32)


def test_cfg_batch_doubling_and_guidance_one(parts):
    bb = _backbone(parts)
    assert isinstance(bb, Backbone) and isinstance(bb.denoiser, Denoiser)
    cond = bb.prepare(PROMPTS)
    x, s = bb.noise([1, 2]), torch.tensor([3.0, 0.5])
    rows = []
    h = bb.unet.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    d = bb.denoiser(x, s, cond)
    h.remove()
    assert rows == [4] and bb.denoiser.passes_per_eval == 2
    plain = SD15Backbone.from_components(*parts, config={"resolution": 32, "guidance_scale": 1.0})
    assert plain.denoiser.passes_per_eval == 1
    # w = 1 gives the conditional prediction; CFG extrapolates it away from the unconditional one.
    d1 = plain.denoiser(x, s, cond)
    uncond = SD15Backbone.from_components(*parts, config={"resolution": 32, "guidance_scale": 0.0})
    d0 = uncond.denoiser(x, s, cond)
    assert torch.allclose(d, d0 + 7.5 * (d1 - d0), atol=1e-5)


def test_long_prompt_is_truncated_with_a_warning(parts):
    bb = _backbone(parts)
    long = " ".join(["astronaut"] * 120)
    with pytest.warns(UserWarning, match="exceed the CLIP text encoder limit of 77"):
        cond = bb.prepare([long, "a cat"])
    ids = bb.tokenizer([long], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(cond.tensors["cond"][:1], bb.text_encoder(ids)[0])


# ---------------------------------------------------------------------- fixture predictors
@needs("rlepd/predictors")
@pytest.mark.parametrize("name", ["f15", "fake-sd15-11"])
def test_fixture_predictor_samples(parts, name):
    pytest.importorskip("epd.legacy")
    table = predictor.load(FIXTURES / name)
    unet, _, te, tok = parts  # no VAE: the default factor 8 gives the original's 64x64 latent at 512 px
    bb = SD15Backbone.from_components(unet, None, te, tok, config={"resolution": 512})
    grid = bb.table_grid(table)
    assert torch.allclose(grid, torch.tensor(SD15_N11, dtype=torch.float64), rtol=0, atol=5e-6)
    rows = []
    h = bb.unet.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    res = solve("epd", bb.denoiser, bb.noise([0]), grid, cond=bb.prepare(["a red car"]), table=table)
    h.remove()
    n, k = table.num_steps, table.num_points
    assert (n, k) == (11, 2)
    assert res.nfe == 2 * (n - 1) == res.paper_nfe == 20  # spec §3.3: SD1.5 N=11 -> NFE 20
    assert res.forward_passes == sum(rows) == 2 * (1 + k) * (n - 1)  # CFG doubling counted
    assert torch.isfinite(res.x).all() and res.x.shape == (1, 4, 64, 64)


@needs("rlepd/predictors")
def test_predictor_for_another_backbone_is_refused(parts):
    pytest.importorskip("epd.legacy")
    bb = _backbone(parts)
    with pytest.raises(ConfigError, match="predictor is for 'sd3'"):
        bb.check_table(predictor.load(FIXTURES / "f512"))
    bb.check_table(predictor.load(FIXTURES / "f15"))  # its img_resolution=1024 is meaningless for SD1.5


# ---------------------------------------------------------------------- weights and config
def _isolate(monkeypatch, tmp_path):
    for var in ("SD15_MODEL_PATH", "EPD_WEIGHTS_DIR", "HF_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("EPD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def test_missing_weights_fail_at_once_listing_places(monkeypatch, tmp_path):
    _isolate(monkeypatch, tmp_path)
    with pytest.raises(MissingWeightsError) as e:
        SD15Backbone.from_pretrained(None, config={"name": "sd15"})
    msg = str(e.value)
    assert str(tmp_path / "data" / "weights" / "sd15") in msg and "SD15_MODEL_PATH" in msg
    assert "dvc pull" not in msg  # data.dvc tracks the digits checkpoints only: no false hint for SD1.5


def test_saved_folder_loads_and_matches_components(monkeypatch, tmp_path):
    """A local diffusers folder (here a tiny one written with save_pretrained) loads through data/weights/."""
    _isolate(monkeypatch, tmp_path)
    unet, vae, te, tok = _tiny(cross_dim=768, sample_size=16)  # native 32 px with the tiny VAE's factor 2
    folder = tmp_path / "data" / "weights" / "sd15"
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, safety_checker=None,
                                   scheduler=PNDMScheduler.from_config(SCHEDULER_CONFIG), feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    loaded = SD15Backbone.from_pretrained(None, config={"resolution": 32})
    ref = SD15Backbone.from_components(unet, vae, te, tok, config={"resolution": 32})
    x = loaded.noise([1])
    assert torch.equal(loaded.denoiser(x, torch.tensor([2.0]), loaded.prepare(["a cat"])),
                       ref.denoiser(x, torch.tensor([2.0]), ref.prepare(["a cat"])))
    # Through the workflow registry with a config section (the weights under data/weights/sd15).
    from epd.backbones import load_backbone

    wf = load_backbone({"kind": "sd15", "name": "sd15", "guidance": 7.5, "resolution": 32, "solvers": ["euler"],
                        "nfes": [10], "metrics": ["clip"], "backend_config": {"timestep_mode": "discrete"}})
    assert isinstance(wf, SD15Backbone) and wf.denoiser.timestep_mode == "discrete"
    # Incomplete folder: every missing file listed, nothing loaded.
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "tokenizer" / "merges.txt").unlink()
    with pytest.raises(MissingWeightsError) as e:
        SD15Backbone.from_pretrained(folder, config={"resolution": 32})
    assert "unet/diffusion_pytorch_model.safetensors" in str(e.value) and "tokenizer/merges.txt" in str(e.value)


def _fake_folder(root: Path, index_class="StableDiffusionPipeline", unet_cfg=None, pred="epsilon"):
    for sub in ("unet", "vae"):
        (root / sub).mkdir(parents=True)
        (root / sub / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (root / "text_encoder").mkdir()
    (root / "text_encoder" / "config.json").write_text("{}")
    (root / "text_encoder" / "model.safetensors").write_bytes(b"")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.json").write_text("{}")
    (root / "tokenizer" / "merges.txt").write_text("")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({**SCHEDULER_CONFIG, "prediction_type": pred}))
    (root / "unet" / "config.json").write_text(json.dumps(unet_cfg or {"_class_name": "UNet2DConditionModel",
                                                                       "cross_attention_dim": 768, "in_channels": 4,
                                                                       "sample_size": 64}))
    (root / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL",
                                                         "block_out_channels": [128, 256, 512, 512]}))
    (root / "model_index.json").write_text(json.dumps({"_class_name": index_class}))
    return root


def test_wrong_architecture_and_resolution_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="FluxPipeline.*StableDiffusionPipeline"):
        SD15Backbone.from_pretrained(_fake_folder(tmp_path / "a", "FluxPipeline"), config={})
    sd2 = {"_class_name": "UNet2DConditionModel", "cross_attention_dim": 1024, "in_channels": 4, "sample_size": 96}
    with pytest.raises(ConfigError, match="not Stable Diffusion 1.5.*cross_attention_dim=1024.*v_prediction"):
        SD15Backbone.from_pretrained(_fake_folder(tmp_path / "b", unet_cfg=sd2, pred="v_prediction"), config={})
    with pytest.raises(ConfigError, match="trained at 512 px"):
        SD15Backbone.from_pretrained(_fake_folder(tmp_path / "c"), config={"resolution": 768})


def test_bad_settings(parts):
    with pytest.raises(ConfigError, match="backbone.guidence_scale: unknown setting"):
        _backbone(parts, guidence_scale=7.5)
    with pytest.raises(ConfigError, match="timestep_mode"):
        _backbone(parts, timestep_mode="nearest")
    with pytest.raises(ConfigError, match="multiple of"):
        _backbone(parts, resolution=34)
    with pytest.raises(ConfigError, match="coords"):
        _backbone(parts, coords="flow")
    with pytest.raises(ConfigError, match="prompts"):
        _backbone(parts).prepare([])
    with pytest.raises(ConfigError, match="not available for SD1.5"):
        _backbone(parts).sigmas(11, "flowmatch")
    # The original's backend_config keys are accepted as aliases.
    bb = _backbone(parts, guidance_rate=5.0, torch_dtype="float32")
    assert bb.denoiser.guidance_scale == 5.0
