"""Issue 9: end-to-end images/s of ``epd sample``'s own code path against diffusers' pipeline, same modules.

Each case builds the real adapter (:class:`epd.backbones.sd15.SD15Backbone`, :class:`epd.backbones.sd3.SD3Backbone`,
:class:`epd.backbones.flux.FluxBackbone`, via ``from_components``) around full-size architectures with random
weights, built directly on the GPU in the CUDA dtype (SD1.5 float16, SD3-Medium and FLUX.1-dev bfloat16): the
denoiser network, the VAE (released configs), the text encoders at real size (CLIP ViT-L/14; SD3 adds OpenCLIP
bigG and T5-v1.1-XXL; FLUX CLIP-L + T5-XXL) and offline tokenizers padding to the real lengths (CLIP 77, SD3 T5 256,
FLUX T5 512). Per image batch, wall clock with ``torch.cuda.synchronize()`` around each repeat:

* ``ours``: exactly what ``epd sample`` runs per batch: ``make_denoiser(bb, "on")`` once (CUDA graphs, captured in
  the warm-up), then ``sample_batch(bb, "euler", seeds, prompts, sigmas, denoiser=den)`` = text encoding, noise,
  10 Euler steps (= DDIM / flow-matching Euler), NaN check, VAE decode;
* ``ours_eager``: the same with ``make_denoiser(bb, "off")``;
* ``diffusers``: ``bb.pipe(prompt=..., num_inference_steps=10, ...)`` with ``output_type="pt"`` on the same modules:
  ``StableDiffusionPipeline`` + ``DDIMScheduler`` (SD1.5), ``StableDiffusion3Pipeline`` / ``FluxPipeline`` with
  their default ``FlowMatchEulerDiscreteScheduler``. Its start latents are ``bb.noise(seeds)`` in the pipeline's
  coordinates (drawn inside the timed call, as ours draws them), so both sides integrate the same ODE from the same
  state; the grid is the pipeline's default 10-step grid (ours: ``schedule="leading"`` for SD1.5,
  ``"flowmatch_official"`` for SD3/FLUX; checked against the scheduler's, ``grid_rel_diff``).

Warm-up runs are excluded (the first one also checks the outputs: ``rel_diff_vs_diffusers`` of the images,
``latent_rel_diff_vs_diffusers`` of the final latents in our coordinates, network calls counted on the diffusers
side); the sides alternate within each repeat. ``throughput_vs_diffusers`` = ours images/s / diffusers images/s.
``--tiny`` runs toy configurations of every component on the CPU (eager, float32) as a smoke test.

Usage::

    python benchmarks/gpu_sample_e2e.py --out benchmarks/results/gpu_sample_e2e.json
    python benchmarks/gpu_sample_e2e.py --tiny --out /tmp/e2e_tiny.json   # CPU smoke run
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))  # offline tokenizer builders (_tiny_tokenizers)

from gpu_common import FULL, TINY, Results, fmt, free, machine_info, med, summary  # noqa: E402

from epd.backbones.flux import FluxBackbone, pack_latents, unpack_latents  # noqa: E402
from epd.backbones.sd3 import SD3Backbone  # noqa: E402
from epd.backbones.sd15 import SCHEDULER_CONFIG as SD15_SCHEDULER, SD15Backbone  # noqa: E402
from epd.graphs import CUDAGraphDenoiser  # noqa: E402
from epd.sample import make_denoiser, sample_batch  # noqa: E402
from epd.study import resolve_grid  # noqa: E402

NFE = 10
SOLVER = "euler"
PROMPTS = ("a photo of an astronaut riding a horse on the moon", "a watercolor painting of a lighthouse at dusk",
           "a red fox in fresh snow, highly detailed", "a bowl of ramen on a wooden table, studio lighting")
# our grid that equals the pipeline's default 10-step grid
SCHEDULE = {"sd15": "leading", "sd3": "flowmatch_official", "flux": "flowmatch_official"}
INCLUDES = "text encoding + noise + 10 evaluations + VAE decode"
CASES = (("sd15", 512), ("sd3", 512), ("sd3", 1024), ("flux", 1024))
TINY_CASES = (("sd15", 64), ("sd3", 64), ("flux", 128))
INIT_STD = 0.02  # Linear/Embedding weights: keeps random activations finite in float16/bfloat16

# ---------------------------------------------------------------------------------------------- configs
# AutoencoderKL of the released checkpoints (vae/config.json): SD1.5 4-ch latent; SD3 / FLUX 16-ch, no quant convs.
_VAE = {"in_channels": 3, "out_channels": 3, "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
        "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
        "act_fn": "silu", "norm_num_groups": 32}
VAE_FULL = {
    "sd15": {**_VAE, "latent_channels": 4, "sample_size": 512, "scaling_factor": 0.18215},
    "sd3": {**_VAE, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609,
            "use_quant_conv": False, "use_post_quant_conv": False},
    "flux": {**_VAE, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159,
             "use_quant_conv": False, "use_post_quant_conv": False},
}
_CLIP_TOK = {"vocab_size": 49408, "max_position_embeddings": 77, "bos_token_id": 49406, "eos_token_id": 49407,
             "pad_token_id": 49407}
CLIP_L = {**_CLIP_TOK, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
          "num_hidden_layers": 12, "projection_dim": 768, "hidden_act": "quick_gelu"}
CLIP_G = {**_CLIP_TOK, "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
          "num_hidden_layers": 32, "projection_dim": 1280, "hidden_act": "gelu"}
T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
          "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
          "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6, "tie_word_embeddings": False}
# toy versions (widths chained as in the real models: CLIP width = UNet cross-attention; SD3 CLIP-L + CLIP-G widths
# <= T5 width = joint_attention_dim, projections sum to pooled_projection_dim; FLUX CLIP width = pooled dim)
_VAE_TINY = {**_VAE, "block_out_channels": (4, 4, 4, 4), "layers_per_block": 1, "norm_num_groups": 2}
VAE_TINY = {k: {**v, **_VAE_TINY, "latent_channels": 4} for k, v in VAE_FULL.items()}
_CLIP_TINY = {**_CLIP_TOK, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1}
T5_TINY = {"d_model": 16, "d_ff": 32, "d_kv": 8, "num_heads": 2, "num_layers": 1, "feed_forward_proj": "gated-gelu"}
TEXT = {
    "full": {"sd15": [("clip", CLIP_L)], "sd3": [("clip_proj", CLIP_L), ("clip_proj", CLIP_G), ("t5", T5_XXL)],
             "flux": [("clip", CLIP_L), ("t5", T5_XXL)]},
    "tiny": {"sd15": [("clip", {**_CLIP_TINY, "hidden_size": 16, "projection_dim": 16})],
             "sd3": [("clip_proj", {**_CLIP_TINY, "hidden_size": 8, "projection_dim": 8})] * 2 + [("t5", T5_TINY)],
             "flux": [("clip", {**_CLIP_TINY, "hidden_size": 16, "projection_dim": 16}), ("t5", T5_TINY)]},
}


def effort(res: int, tiny: bool) -> tuple[int, int]:
    """(warm-up runs, timed repeats) per side."""
    return (1, 2) if tiny else ((3, 5) if res < 1024 else (2, 3))


# ---------------------------------------------------------------------------------------------- building
def _on_device(make, dtype: torch.dtype, device: torch.device, seed: int):
    """``make()`` with parameters created directly on ``device`` in ``dtype``; Linear/Embedding weights redrawn
    from N(0, INIT_STD^2) so that random activations stay finite in half precision."""
    prev = torch.get_default_dtype()
    torch.manual_seed(seed)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            m = make()
            for mod in m.modules():
                if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
                    torch.nn.init.normal_(mod.weight, std=INIT_STD)
    finally:
        torch.set_default_dtype(prev)
    return m.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _text_encoder(kind: str, cfg: dict, t5_vocab: int | None):
    import transformers as tf

    if kind == "t5":
        return lambda: tf.T5EncoderModel(tf.T5Config(**{"vocab_size": t5_vocab, **cfg}))
    cls = tf.CLIPTextModelWithProjection if kind == "clip_proj" else tf.CLIPTextModel
    return lambda: cls(tf.CLIPTextConfig(**cfg))


def build_components(name: str, device: torch.device, tiny: bool) -> dict:
    """Denoiser network, VAE, text encoders and tokenizers of one backbone, random weights, on ``device``."""
    import diffusers
    from transformers import CLIPTokenizer, T5TokenizerFast

    from _tiny_tokenizers import clip_tokenizer_dir, t5_tokenizer_dir

    spec = (TINY if tiny else FULL)[name]
    dt = spec["dtype"]
    t0 = time.perf_counter()
    net = _on_device(lambda: getattr(diffusers, spec["class"])(**spec["config"]), dt, device, 0)
    vae = _on_device(lambda: diffusers.AutoencoderKL(**(VAE_TINY if tiny else VAE_FULL)[name]), dt, device, 1)
    clip_tok = CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()), model_max_length=77)
    t5_tok = T5TokenizerFast.from_pretrained(str(t5_tokenizer_dir())) if name != "sd15" else None
    encoders, toks = [], []
    for i, (kind, cfg) in enumerate(TEXT["tiny" if tiny else "full"][name]):
        # the tokenizer's ids index the embedding; the real vocabulary size is kept (32128 > len(t5_tok))
        vocab = len(t5_tok) if tiny and kind == "t5" else None
        encoders.append(_on_device(_text_encoder(kind, cfg, vocab), dt, device, 2 + i))
        toks.append(t5_tok if kind == "t5" else clip_tok)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"net": net, "vae": vae, "encoders": encoders, "tokenizers": toks, "dtype": dt, "spec": spec,
            "build_s": round(time.perf_counter() - t0, 2)}


def make_backbone(name: str, comp: dict, res: int, device: torch.device):
    """The real adapter around the components; SD1.5's pipeline gets DDIM (our Euler on the ``leading`` grid)."""
    from diffusers import DDIMScheduler

    cfg = {"resolution": res}
    if name == "sd15":
        bb = SD15Backbone.from_components(comp["net"], comp["vae"], comp["encoders"][0], comp["tokenizers"][0],
                                          config=cfg, device=device)
        bb.pipe.scheduler = DDIMScheduler.from_config(SD15_SCHEDULER)
    elif name == "sd3":
        bb = SD3Backbone.from_components(comp["net"], comp["vae"], tuple(comp["encoders"]), tuple(comp["tokenizers"]),
                                         config=cfg, device=device)
    else:
        bb = FluxBackbone.from_components(comp["net"], comp["vae"], tuple(comp["encoders"]),
                                          tuple(comp["tokenizers"]), config=cfg, device=device)
    bb.pipe.set_progress_bar_config(disable=True)
    return bb


# ---------------------------------------------------------------------------------------------- the two sides
def pipeline_latents(name: str, bb, seeds: list[int], vp_scale: float, dtype: torch.dtype,
                     sigma0: float | None = None) -> torch.Tensor:
    """``bb.noise(seeds, sigma=sigma0)`` (our start state, as ``sample_batch`` draws it) in the pipeline's coordinates
    and dtype: SD1.5 EDM -> VP at the first grid point (``x / sqrt(1 + sigma_0^2)``; DDIM's ``init_noise_sigma`` is
    1), FLUX packed 2x2."""
    z = bb.noise(seeds) if sigma0 is None else bb.noise(seeds, sigma=sigma0)
    if name == "sd15":
        z = z * vp_scale
    elif name == "flux":
        z = pack_latents(z)
    return z.to(dtype)


def pipeline_grid(name: str, sched) -> torch.Tensor:
    """The grid the pipeline's scheduler ran, in our coordinates (EDM sigmas for SD1.5, flow time otherwise)."""
    if name == "sd15":
        ac = sched.alphas_cumprod.to(torch.float64)
        s = ((1 - ac[sched.timesteps.long().cpu()]) / ac[sched.timesteps.long().cpu()]).sqrt()
        fa = torch.as_tensor(sched.final_alpha_cumprod, dtype=torch.float64).reshape(1)
        return torch.cat([s, ((1 - fa) / fa).sqrt()])
    return sched.sigmas.to(torch.float64).cpu()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.to(a.device).double()
    return float((a - b).norm() / b.norm())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, res: int, B: int, bb, comp: dict, device: torch.device, machine: dict, *, tiny: bool,
            warmup: int, reps: int) -> dict:
    """One row: images/s of ours (graphed, eager) and of the pipeline for an image batch of ``B``."""
    seeds, prompts = list(range(B)), [PROMPTS[i % len(PROMPTS)] for i in range(B)]
    sigmas = resolve_grid(bb, SOLVER, nfe=NFE, schedule=SCHEDULE[name])
    vp_scale = float(1 / torch.sqrt(1 + sigmas[0].double() ** 2)) if name == "sd15" else 1.0
    g = float(bb.settings["guidance_scale"])
    pipe_kw = {"prompt": prompts, "num_inference_steps": NFE, "guidance_scale": g, "height": res, "width": res,
               "output_type": "pt"}
    if name != "sd15":
        pipe_kw["max_sequence_length"] = bb.settings["max_sequence_length"]
    graphs = "auto" if tiny else "on"  # CPU: make_denoiser("on") refuses; "auto" is the eager denoiser there
    den = make_denoiser(bb, graphs)
    den_eager = make_denoiser(bb, "off")

    def ours(d):
        return sample_batch(bb, SOLVER, seeds, prompts, sigmas, denoiser=d)

    def diffusers_run(**extra):
        lat = pipeline_latents(name, bb, seeds, vp_scale, comp["dtype"], float(sigmas[0]))
        return bb.pipe(latents=lat, **pipe_kw, **extra).images

    row = {"backbone": name, "resolution": res, "gpus": 1, "gpu": machine["gpu"], "driver": machine["driver"],
           "torch": machine["torch"], "diffusers": machine["diffusers"],
           "dtype": str(comp["dtype"]).replace("torch.", ""), "batch": B, "nfe": NFE, "solver": SOLVER,
           "schedule": SCHEDULE[name], "scheduler": type(bb.pipe.scheduler).__name__, "guidance_scale": g,
           "cuda_graphs": graphs, "includes": INCLUDES, "warmup": warmup, "repeats": reps}
    if name != "sd15":
        row["t5_max_length"] = bb.settings["max_sequence_length"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # warm-up 1 (graph capture) doubles as the output check
    x_g, img_g, out = ours(den)
    x_e, img_e, _ = ours(den_eager)
    final, calls = [], []
    net = bb.denoiser.transformer if name != "sd15" else bb.unet
    hook = net.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        img_d = diffusers_run(callback_on_step_end=lambda p, i, t, kw: final.append(kw["latents"]) or {})
    finally:
        hook.remove()
    lat_d = final[-1].float()
    if name == "sd15":  # DDIM ends in VP coordinates at abar_0: x_edm = x_vp * sqrt(1 + sigma_last^2)
        lat_d = lat_d * float(torch.sqrt(1 + sigmas[-1].double() ** 2))
    elif name == "flux":
        lat_d = unpack_latents(lat_d, *bb.latent_shape[1:])
    grid_d = pipeline_grid(name, bb.pipe.scheduler)
    row.update(
        ours_nfe=out.nfe, ours_forward_passes=out.forward_passes, diffusers_network_calls=len(calls),
        grid_points=len(sigmas),
        grid_rel_diff=float((sigmas.double() - grid_d).abs().max() / grid_d.abs().max()) if len(grid_d) == len(
            sigmas) else None,
        rel_diff_vs_diffusers=rel(img_g, img_d), latent_rel_diff_vs_diffusers=rel(x_g, lat_d),
        eager_rel_diff_vs_diffusers=rel(img_e, img_d), graphed_vs_eager_rel_diff=rel(x_g, x_e),
        diffusers_finite=bool(torch.isfinite(img_d).all()))
    del x_g, img_g, x_e, img_e, img_d, lat_d, final

    sides = {"ours": lambda: ours(den), "ours_eager": lambda: ours(den_eager), "diffusers": diffusers_run}
    for _ in range(warmup - 1):
        for fn in sides.values():
            fn()
    times = {k: [] for k in sides}
    for _ in range(reps):
        for k, fn in sides.items():  # alternate sides within a repeat (clock drift hits all alike)
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append((time.perf_counter() - t0) * 1e3)
    ips = {k: B / (med(v) / 1e3) for k, v in times.items()}
    for k, v in times.items():
        row[f"{k}_ms"] = summary(v)
        row[f"{k}_images_per_s"] = ips[k]
    row["throughput_vs_diffusers"] = ips["ours"] / ips["diffusers"]
    row["eager_throughput_vs_diffusers"] = ips["ours_eager"] / ips["diffusers"]
    graphed = isinstance(den, CUDAGraphDenoiser) and den.capture_error is None and den.replays > 0
    row["graphed"] = graphed
    row["capture_error"] = den.capture_error if isinstance(den, CUDAGraphDenoiser) else (
        None if device.type == "cuda" else "CPU run: CUDA graphs not used")
    if device.type == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return row


# ---------------------------------------------------------------------------------------------- CLI
def parse_cases(text: str, ap) -> list[tuple[str, int]]:
    out = []
    for item in filter(None, (c.strip() for c in text.split(","))):
        name, _, res = item.partition(":")
        if name not in SCHEDULE or not res.isdigit():
            ap.error(f"--cases: {item!r} is not backbone:resolution with backbone in {sorted(SCHEDULE)}")
        out.append((name, int(res)))
    return out


def parse_ints(text: str, flag: str, ap) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        ap.error(f"{flag}: expected a comma list of positive integers, got {text!r}")
    return vals


def run_cases(cases, batches, batches_big, args, device, machine, res_doc) -> None:
    """Measure every case and batch into ``res_doc`` (modules built once per backbone, freed after)."""
    comp, comp_name = None, None
    for name, r in cases:
        if comp_name != name:  # one set of modules per backbone, shared by its resolutions
            comp = None
            free()
            try:
                comp, comp_name = build_components(name, device, args.tiny), name
            except Exception as e:  # noqa: BLE001 (record and go on)
                comp_name = None
                res_doc.add({"backbone": name, "resolution": r, "gpu": machine["gpu"],
                             "error": f"build: {type(e).__name__}: {e}"[:400]})
                continue
        for B in (batches if r < 1024 else batches_big):
            wu, reps = effort(r, args.tiny)
            wu, reps = args.warmup or wu, args.repeats or reps
            bb = None
            try:
                bb = make_backbone(name, comp, r, device)
                row = measure(name, r, B, bb, comp, device, machine, tiny=args.tiny, warmup=wu, reps=reps)
                row["build_s"] = comp["build_s"]
                res_doc.add(row)
                print(f"{name} {r} B={B}: ours {fmt(row['ours_images_per_s'], 3)} img/s, eager "
                      f"{fmt(row['ours_eager_images_per_s'], 3)}, diffusers {fmt(row['diffusers_images_per_s'], 3)} "
                      f"-> x{fmt(row['throughput_vs_diffusers'], 3)} (graphed {row['graphed']}, rel diff "
                      f"{row['rel_diff_vs_diffusers']:.2e})", flush=True)
            except Exception as e:  # noqa: BLE001
                res_doc.add({"backbone": name, "resolution": r, "batch": B, "gpu": machine["gpu"],
                             "error": f"{type(e).__name__}: {e}"[:400]})
                print(f"{name} {r} B={B}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            del bb
            free()
    del comp
    free()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_sample_e2e.json"))
    ap.add_argument("--cases", default=None, help="comma list backbone:resolution (default "
                    + ",".join(f"{n}:{r}" for n, r in CASES) + "; --tiny: "
                    + ",".join(f"{n}:{r}" for n, r in TINY_CASES) + ")")
    ap.add_argument("--batches", default="1,4", help="image batches below 1024 px")
    ap.add_argument("--batches-1024", dest="batches_1024", default="1", help="image batches at >= 1024 px")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per side (default 5 below 1024 px, 3 at "
                    "1024, 2 with --tiny)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up runs per side, >= 1 (the first captures the "
                    "graphs and checks the outputs; default 3 below 1024 px, 2 at 1024, 1 with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="toy configs on the CPU (smoke test)")
    args = ap.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        ap.error(f"--repeats: must be >= 1, got {args.repeats}")
    if args.warmup is not None and args.warmup < 1:
        ap.error(f"--warmup: must be >= 1 (the first run captures the CUDA graphs), got {args.warmup}")
    cases = parse_cases(args.cases, ap) if args.cases else list(TINY_CASES if args.tiny else CASES)
    batches = parse_ints(args.batches, "--batches", ap)
    batches_big = parse_ints(args.batches_1024, "--batches-1024", ap)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if not args.tiny and device.type != "cuda":
        ap.error("full-size architectures need a CUDA device; use --tiny on the CPU")
    threads = torch.get_num_threads()
    if args.tiny:
        torch.set_num_threads(1)
    machine = machine_info(device)
    res_doc = Results(args.out, "gpu_sample_e2e", machine, tiny=args.tiny, nfe=NFE, solver=SOLVER, includes=INCLUDES,
                      cases=[f"{n}:{r}" for n, r in cases])
    try:
        with torch.no_grad():  # as `epd sample`; graphs need autograd off
            run_cases(cases, batches, batches_big, args, device, machine, res_doc)
    finally:
        torch.set_num_threads(threads)
    res_doc.write(complete=True)
    print(f"{'backbone':8} {'res':>5} {'B':>2} {'ours':>8} {'eager':>8} {'diffusers':>9} {'vs_diff':>8} "
          f"{'eager_vs':>8} {'graphed':>7} {'rel_img':>9}")
    for row in res_doc.doc["rows"]:
        if "error" in row:
            print(f"{row['backbone']:8} {row['resolution']:>5} error: {row['error'][:120]}")
            continue
        rd = row["rel_diff_vs_diffusers"]
        print(f"{row['backbone']:8} {row['resolution']:>5} {row['batch']:>2} {fmt(row['ours_images_per_s'], 3):>8} "
              f"{fmt(row['ours_eager_images_per_s'], 3):>8} {fmt(row['diffusers_images_per_s'], 3):>9} "
              f"{fmt(row['throughput_vs_diffusers'], 3):>8} {fmt(row['eager_throughput_vs_diffusers'], 3):>8} "
              f"{str(row['graphed']):>7} {rd if not math.isfinite(rd) else f'{rd:.2e}':>9}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
