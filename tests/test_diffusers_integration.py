"""EPD tables in stock diffusers pipelines (:mod:`epd.diffusers`), on tiny random pipelines of all three families.

The scheduler path (``pipe.scheduler = EPDScheduler...`` in the unmodified pipeline, K points one call each),
``apply_epd`` (K points in one call) and ``epd sample``'s sampler (:func:`epd.sample.sample_batch` on the grid
:func:`epd.study.resolve_grid` gives it) run on the same components and noise and must give the same latents; the
original's released tables load into the scheduler; wrong tables and settings are refused with a clear error.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler  # noqa: E402

from _shared import FIXTURES as SHARED_FIXTURES, needs  # noqa: E402
from _tiny_pipelines import (flux_pipe, rel, sd3_pipe, sd15_pipe, tiny_flux, tiny_sd3, tiny_sd15)  # noqa: E402
from epd import predictor  # noqa: E402
from epd.backbones import backbone_class  # noqa: E402
from epd.diffusers import EPDScheduler, apply_epd  # noqa: E402
from epd.errors import ConfigError  # noqa: E402
from epd.sample import sample_batch  # noqa: E402
from epd.study import resolve_grid  # noqa: E402
from epd.table import EPDTable  # noqa: E402

FIXTURES = SHARED_FIXTURES / "rlepd" / "predictors"
PROMPTS = ["a cat", "a photo of an astronaut riding a horse"]
SEEDS = [3, 4]
MAX_SEQ = 16
# family -> (tiny parts, pipeline builder, stock scheduler, resolution, guidance, extra call/backbone settings)
FAMILIES = {
    "sd15": (tiny_sd15, sd15_pipe, lambda: EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1), 32, 7.5, {}),
    "sd3": (tiny_sd3, sd3_pipe, lambda: FlowMatchEulerDiscreteScheduler(shift=3.0), 128, 4.5,
            {"max_sequence_length": MAX_SEQ}),
    "flux": (tiny_flux, flux_pipe, lambda: FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15), 128, 3.5,
        {"max_sequence_length": MAX_SEQ}),
}


@pytest.fixture(scope="module")
def built():
    """family -> (parts, pipeline with its stock scheduler); tiny random float32 components."""
    torch.set_num_threads(1)
    out = {}
    for kind, (tiny, make, stock, *_rest) in FAMILIES.items():
        parts = tiny()
        out[kind] = (parts, make(parts, stock()))
    return out


def _table(kind: str, N: int, K: int, *, scales=True, afs=False, seed=0, **meta) -> EPDTable:
    """A table with uneven positions and weights (and direction/time scales) for the family's grid."""
    g = torch.Generator().manual_seed(seed)
    seg = torch.rand(N - 1, K + 1, generator=g, dtype=torch.float64) + 0.2
    w = torch.rand(N - 1, K, generator=g, dtype=torch.float64) + 0.2
    scale = (lambda: 1 + 0.1 * (torch.rand(N - 1, K, generator=g, dtype=torch.float64) - 0.5)) if scales else None
    schedule = "discrete" if kind == "sd15" else "flowmatch"
    return EPDTable.from_segments(seg / seg.sum(1, keepdim=True), w / w.sum(1, keepdim=True),
                                  scale_dir=scale() if scale else None, scale_time=scale() if scale else None,
                                  meta={"backbone": kind, "schedule_type": schedule, "afs": afs, **meta})


def _backbone(kind, built, **cfg):
    parts = built[kind][0]
    _, _, _, res, guidance, extra = FAMILIES[kind]
    config = {"resolution": res, "guidance_scale": guidance, **extra, **cfg}
    cls = backbone_class(kind)
    if kind == "sd15":
        return cls.from_components(*parts, config=config)
    return cls.from_components(parts[0], parts[1], parts[2], parts[3], config=config)


def _call(kind, pipe, steps, **kw):
    """The pipeline called as a user would, seeded like ``epd sample`` (one CPU generator per image)."""
    _, _, _, res, guidance, extra = FAMILIES[kind]
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="latent",
                height=res, width=res, **extra, **kw).images


def _model(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


def _count_calls(module):
    calls = []
    return calls, module.register_forward_pre_hook(lambda m, a: calls.append(1))


# ---------------------------------------------------------------------- three paths, same latents
CASES = [("sd15", 6, 2, {}), ("sd15", 5, 3, {"plugin": "ipndm"}), ("sd3", 6, 2, {"afs": True}), ("sd3", 5, 1, {}),
         ("flux", 6, 2, {}), ("flux", 4, 3, {"afs": True})]


@pytest.mark.parametrize("kind,N,K,opts", CASES, ids=[f"{c[0]}-N{c[1]}-K{c[2]}-{'-'.join(c[3]) or 'plain'}"
                                                      for c in CASES])
def test_scheduler_apply_epd_and_epd_sample_give_the_same_latents(built, kind, N, K, opts, tmp_path):
    plugin = opts.get("plugin")
    table = _table(kind, N, K, afs=opts.get("afs", False), seed=N * 10 + K)
    predictor.save(table, tmp_path / "table.safetensors")
    stock = built[kind][1]
    # epd sample's sampler on an adapter around the same components
    bb = _backbone(kind, built)
    solver = "epd_ipndm" if plugin else "epd"
    sigmas = resolve_grid(bb, solver, table=table)
    ref, _, ref_out = sample_batch(bb, solver, SEEDS, PROMPTS, sigmas, table)
    # the scheduler, through a saved scheduler folder, in the unmodified pipeline
    EPDScheduler.from_table(tmp_path / "table.safetensors", stock.scheduler.config, plugin=plugin).save_pretrained(
        tmp_path / "scheduler")
    sched = EPDScheduler.from_pretrained(tmp_path / "scheduler")
    assert sched.table.equal(table) and sched.config.plugin == plugin
    pipe = type(stock)(**{**stock.components, "scheduler": sched})
    calls, hook = _count_calls(_model(pipe))
    lat = _call(kind, pipe, N - 1)
    hook.remove()
    assert torch.allclose(sched.sigmas, sigmas, rtol=1e-12, atol=0)
    assert len(calls) == (K + 1) * (N - 1)  # the points one after another, the probe first (also at step 0 with AFS)
    assert rel(bb.from_pipeline_latents(lat), ref) <= 1e-5
    # apply_epd: the pipeline's components, K points per call
    calls, hook = _count_calls(_model(stock))
    _, _, _, res, guidance, extra = FAMILIES[kind]
    out = apply_epd(stock, tmp_path / "table.json", plugin=plugin)(
        PROMPTS, generator=[torch.Generator().manual_seed(s) for s in SEEDS], guidance_scale=guidance, height=res,
        output_type="latent", num_inference_steps=N - 1, **extra)
    hook.remove()
    assert rel(bb.from_pipeline_latents(out.images), ref) <= 1e-5
    assert len(calls) == out.nfe == ref_out.nfe == 2 * (N - 1) - int(opts.get("afs", False))
    assert out.forward_passes == ref_out.forward_passes and out.paper_nfe == ref_out.paper_nfe


def test_scheduler_keeps_fp32_state_and_default_latents_follow_the_pipeline(built):
    """Without latents or generators given, both paths draw the pipeline's own noise from the global seed; a state
    handed back in another dtype does not leak into the EPD state."""
    kind = "sd3"
    table = _table(kind, 4, 2, seed=1)
    stock = built[kind][1]
    pipe = type(stock)(**{**stock.components, "scheduler": EPDScheduler.from_table(table)})
    _, _, _, res, guidance, extra = FAMILIES[kind]
    torch.manual_seed(7)
    a = pipe(PROMPTS, num_inference_steps=3, guidance_scale=guidance, output_type="latent", height=res, width=res,
             **extra).images
    torch.manual_seed(7)
    b = apply_epd(stock, table)(PROMPTS, guidance_scale=guidance, output_type="latent", height=res, **extra).images
    assert rel(a, b) <= 1e-5
    sched = pipe.scheduler
    sched.set_timesteps(3)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    v = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    y = sched.step(v.half(), sched.timesteps[0], x.half()).prev_sample
    assert y.dtype == torch.float16 and sched._state["y"].dtype == torch.float32


def test_sigmas_call_argument(built, tmp_path):
    """``sigmas``: FluxPipeline's default (``linspace(1, 1/n, n)``, passed even when the user gives none) and the
    table's own grid select the table's grid; SD3's ``mu`` argument is a dynamic shift its table does not have. A
    pipeline saved with the scheduler reloads it from its folder."""
    import numpy as np

    flux = built["flux"][1]
    table = _table("flux", 5, 2, seed=5)
    pipe = type(flux)(**{**flux.components, "scheduler": EPDScheduler.from_table(table)})
    a = _call("flux", pipe, 4)
    assert torch.equal(_call("flux", pipe, None, sigmas=np.linspace(1.0, 1 / 4, 4)), a)
    sd3 = built["sd3"][1]
    table = _table("sd3", 5, 2, seed=6)
    sched = EPDScheduler.from_table(table)
    pipe = type(sd3)(**{**sd3.components, "scheduler": sched})
    b = _call("sd3", pipe, 4)
    assert torch.equal(_call("sd3", pipe, None, sigmas=sched.table_grid().tolist()), b)
    with pytest.raises(ConfigError, match="mu: the table is for 'sd3'"):
        _call("sd3", pipe, 4, mu=1.0)
    pipe.save_pretrained(tmp_path)
    again = EPDScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert again.table.equal(table)
    pipe = type(sd3)(**{**sd3.components, "scheduler": again})
    assert torch.equal(_call("sd3", pipe, 4), b)


# ---------------------------------------------------------------------- the original's released tables
RELEASED = FIXTURES.parent / "best_models"


@needs("rlepd/best_models")
def test_every_released_table_round_trips_through_a_scheduler_folder(tmp_path):
    pkls = sorted(RELEASED.rglob("*.pkl"))
    assert len(pkls) == 10
    for i, pkl in enumerate(pkls):
        table = predictor.load(pkl)
        EPDScheduler.from_table(pkl).save_pretrained(tmp_path / str(i))
        loaded = EPDScheduler.from_pretrained(tmp_path / str(i))
        assert loaded.table.equal(table) and loaded.table.meta == json.loads(json.dumps(table.meta, default=str))
        doc = json.loads((tmp_path / str(i) / "scheduler_config.json").read_text())
        assert doc["_class_name"] == "EPDScheduler" and doc["backbone"] == table.meta["backbone"]


@needs("rlepd/best_models")
@pytest.mark.parametrize("rel_path,kind,res", [("sd15/sd15-best.pkl", "sd15", 32),
                                               ("sd3-512/sd3-512-best.pkl", "sd3", 512), ("flux.pkl", "flux", 1024)])
def test_released_tables_load_into_the_scheduler(built, rel_path, kind, res):
    """The released SD1.5, SD3-512 and FLUX tables: the scheduler's grid is the one the backbone adapter gives the
    table, with K + 1 evaluations per step, each step's first at the grid point in the model's time input."""
    table = predictor.load(RELEASED / rel_path)
    sched = EPDScheduler.from_table(RELEASED / rel_path)
    assert sched.table.equal(table) and sched.kind == kind
    parts = built[kind][0]
    cls = backbone_class(kind)
    config = {"resolution": res, "guidance_scale": table.meta["guidance_rate"]}
    bb = (cls.from_components(*parts, config=config) if kind == "sd15"  # no VAE: factor 8, the released latents
          else cls.from_components(parts[0], None, parts[2], parts[3], config=config))
    mu = bb.mu if kind == "flux" else None
    N, K = table.num_steps, table.num_points
    sched.set_timesteps(N - 1, mu=mu)
    assert torch.allclose(sched.sigmas, bb.table_grid(table), rtol=1e-12, atol=0)
    assert len(sched.timesteps) == (K + 1) * (N - 1)
    probe = sched.timesteps[:: K + 1].double()
    grid = sched.sigmas[:-1].float().double()
    want = bb.denoiser.timestep(grid) if kind == "sd15" else grid * 1000
    assert torch.allclose(probe, want.float().double(), rtol=1e-6, atol=0)


@needs("rlepd/best_models")
def test_released_sd3_512_table_in_the_pipeline_matches_epd_sample(built):
    table = predictor.load(RELEASED / "sd3-512" / "sd3-512-best.pkl")
    stock = built["sd3"][1]
    bb = _backbone("sd3", built, resolution=512)
    sigmas = resolve_grid(bb, "epd", table=table)
    ref, _, out = sample_batch(bb, "epd", SEEDS[:1], PROMPTS[:1], sigmas, table)
    pipe = type(stock)(**{**stock.components, "scheduler": EPDScheduler.from_table(RELEASED / "sd3-512" /
                                                                                   "sd3-512-best.pkl")})
    lat = pipe(PROMPTS[:1], num_inference_steps=10, guidance_scale=4.5, output_type="latent", height=512, width=512,
               generator=torch.Generator().manual_seed(SEEDS[0]), max_sequence_length=MAX_SEQ).images
    assert rel(lat, ref) <= 1e-5 and out.paper_nfe == 20


# ---------------------------------------------------------------------- bad input
def test_steps_that_do_not_match_the_table_are_refused(built):
    table = _table("sd3", 6, 2)
    stock = built["sd3"][1]
    pipe = type(stock)(**{**stock.components, "scheduler": EPDScheduler.from_table(table)})
    with pytest.raises(ConfigError, match=r"num_inference_steps: the EPD table has N=6 grid points, i\.e\. 5 steps; "
                                          r"call the pipeline with num_inference_steps=5 \(got 28\)"):
        _call("sd3", pipe, 28)
    with pytest.raises(ConfigError, match="num_inference_steps=5"):
        apply_epd(stock, table)(PROMPTS, num_inference_steps=6, height=128, max_sequence_length=MAX_SEQ)
    flux = built["flux"][1]
    fpipe = type(flux)(**{**flux.components, "scheduler": EPDScheduler.from_table(_table("flux", 6, 2))})
    with pytest.raises(ConfigError, match=r"num_inference_steps=5 \(got 28\)"):  # FluxPipeline's default steps
        fpipe(PROMPTS, height=128, width=128, output_type="latent", max_sequence_length=MAX_SEQ)
    with pytest.raises(ConfigError, match="sigmas: an EPD table fixes its grid"):
        _call("flux", fpipe, None, sigmas=[1.0, 0.8, 0.6, 0.4, 0.3])


@pytest.mark.parametrize("table_kind,pipe_kind,message", [
    ("sd3", "sd15", "pipeline: the EPD table is for 'sd3' .StableDiffusion3Pipeline., but this pipeline calls "
                    "scheduler.scale_model_input"),
    ("sd15", "sd3", "pipeline: the EPD table is for 'sd15' .StableDiffusionPipeline., but this pipeline does not call"),
    ("flux", "sd15", "mu: the 'flux' table's grid needs the pipeline's dynamic shift mu"),
    ("flux", "sd3", r"pipeline: the EPD table is for 'flux' \(FluxPipeline, latents of 3 dims\)"),
    ("sd15", "flux", "mu: the table is for 'sd15' .StableDiffusionPipeline., which has no time shift"),
    ("sd3", "flux", "mu: the table is for 'sd3' .StableDiffusion3Pipeline, static shift."),
])
def test_a_table_for_another_backbone_is_refused(built, table_kind, pipe_kind, message):
    stock = built[pipe_kind][1]
    pipe = type(stock)(**{**stock.components, "scheduler": EPDScheduler.from_table(_table(table_kind, 4, 2))})
    with pytest.raises(ConfigError, match=message):
        _call(pipe_kind, pipe, 3)
    with pytest.raises(ConfigError, match=f"pipe: the EPD table is for '{table_kind}'"):
        apply_epd(stock, _table(table_kind, 4, 2))


def test_schedule_and_table_errors(built):
    flux = built["flux"][1]
    made_at_1024 = _table("flux", 4, 2, flowmatch_mu=1.15, img_resolution=1024)
    pipe = type(flux)(**{**flux.components, "scheduler": EPDScheduler.from_table(made_at_1024)})
    with pytest.raises(ConfigError, match=r"mu: the table was made with mu=1.15 \(1024 px\), the pipeline asks for "
                                          r"mu=0.4675: run the pipeline at the table's resolution"):
        _call("flux", pipe, 3)
    with pytest.raises(ConfigError, match="resolution: predictor was made at 1024 px"):
        apply_epd(flux, made_at_1024)(PROMPTS, height=128, max_sequence_length=MAX_SEQ)
    sd3 = built["sd3"][1]
    pipe = type(sd3)(**{**sd3.components, "scheduler": EPDScheduler.from_table(_table("sd3", 4, 2,
                                                                                      img_resolution=512))})
    with pytest.raises(ConfigError, match=r"resolution: the table was made at 512 px, the pipeline samples 128 px "
                                          r"\(latents \(4, 16, 16\)\); call it with height=width=512"):
        _call("sd3", pipe, 3)
    pipe.scheduler = EPDScheduler.from_table(_table("sd3", 4, 2, img_resolution=128))
    assert _call("sd3", pipe, 3).shape == (2, 4, 16, 16)
    pipe = type(flux)(**{**flux.components, "scheduler": EPDScheduler.from_table(_table("flux", 4, 2,
                                                                                        img_resolution=256))})
    with pytest.raises(ConfigError, match="resolution: the table was made at 256 px, the pipeline samples 128 px"):
        _call("flux", pipe, 3)
    with pytest.raises(ConfigError, match="shift: the table was made with shift 2.0"):
        EPDScheduler.from_table(_table("sd3", 4, 2, flowmatch_shift=2.0)).set_timesteps(3)
    with pytest.raises(ConfigError, match="table: its metadata names no backbone"):
        EPDScheduler.from_table(EPDTable(torch.tensor([[0.5]]), torch.tensor([[1.0]])))
    with pytest.raises(ConfigError, match="backbone: the table is for 'gmm', which has no diffusers pipeline"):
        EPDScheduler.from_table(_table("gmm", 3, 1))
    with pytest.raises(ConfigError, match="table: EPDScheduler needs an EPD table"):
        EPDScheduler()
    with pytest.raises(ConfigError, match="coords: the table steps in 'edm' coordinates"):
        EPDScheduler.from_table(_table("sd3", 4, 2, coords="edm"))


# ---------------------------------------------------------------------- the GPU benchmark, tiny on the CPU
def test_gpu_benchmark_tiny_rows_are_complete_and_consistent(tmp_path):
    """``benchmarks/gpu_diffusers_integration.py --size tiny`` on tiny fake weights: one row per backbone and path,
    each with the issue's keys; the network calls it counts are what each path's scheduler or sampler makes."""
    import importlib.util

    import diffusers

    from epd.backbones.weights import REGISTRY
    from epd.fake_weights import write_fake_weights

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_diffusers_integration.py"
    spec = importlib.util.spec_from_file_location("gpu_diffusers_integration", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    write_fake_weights(tmp_path / "w", "tiny", backbones=["sd15", "flux"], scorers=[], log=lambda _: None)
    out = tmp_path / "r.json"
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--size", "tiny", "--weights", str(tmp_path / "w"), "--backbones", "sd15,flux",
                           "--repeats", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    doc = json.loads(out.read_text())
    assert doc["complete"] and {"torch", "diffusers", "gpu"} <= doc["machine"].keys()
    rows = doc["rows"]
    assert [(r["backbone"], r["path"]) for r in rows] == [(b, p) for b in ("sd15", "flux") for p in bench.PATHS]
    for r in rows:
        assert "error" not in r and {"backbone", "resolution", "path", "nfe", "ms_per_image", "gpu"} <= r.keys()
        assert r["ms_per_image"] > 0 and r["gpu"] == doc["machine"]["gpu"] and r["resolution"] == 64
    for kind in ("sd15", "flux"):
        by = {r["path"]: r for r in rows if r["backbone"] == kind}
        N, K = doc["table_shapes"][kind]["N"], doc["table_shapes"][kind]["K"]
        folder = tmp_path / "w" / REGISTRY[("backbone", kind)].rel / "scheduler"
        stock = getattr(diffusers, by["stock_default"]["scheduler"]).from_pretrained(folder)
        stock.set_timesteps(by["stock_default"]["steps"], **({"mu": 1.0} if stock.config.get("use_dynamic_shifting")
                                                             else {}))
        assert by["stock_default"]["nfe"] == len(stock.timesteps)
        assert by["stock_euler_equal_nfe"]["nfe"] == by["apply_epd"]["nfe"] == 2 * (N - 1)
        assert by["epd_scheduler"]["nfe"] == (K + 1) * (N - 1)
        assert by["epd_scheduler"]["steps"] == by["apply_epd"]["steps"] == N - 1
    with pytest.raises(SystemExit):
        bench.main(["--size", "tiny", "--backbones", "sdxl", "--out", str(out)])
