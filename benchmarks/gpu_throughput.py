"""Question 3: end-to-end images/s of our sampling path against diffusers' own pipeline, same network, resolution,
NFE, guidance and scheduler grid.

Both sides start from pre-computed text embeddings (diffusers takes ``prompt_embeds`` & co., so no text encoder
runs on either side) and stop at the final latents (``output_type="latent"``; the VAE decode is the same module on
both sides and is left out). Per image batch we time, with CUDA events around the whole call:

* ``diffusers``: ``StableDiffusionPipeline`` + ``DDIMScheduler`` (SD1.5), ``StableDiffusion3Pipeline`` +
  ``FlowMatchEulerDiscreteScheduler`` (SD3), ``FluxPipeline`` + dynamic-shift flow-matching Euler (FLUX), NFE
  denoiser calls;
* ``ours_fused``: :class:`epd.graphs.GraphedEulerSampler` (each step one CUDA-graph replay) on the same grid, i.e.
  the same Euler/DDIM update and NFE, noise drawn per seed as ``backbone.noise`` does;
* ``ours_solve``: ``epd.solvers.solve("euler", CUDAGraphDenoiser(D), ...)`` (the ``epd sample`` loop with a graphed
  denoiser, per-call NaN check included);
* ``epd_k2``: EPD with K = 2 at the same paper-NFE (one GPU, :class:`epd.graphs.GraphedEPDSampler`), for reference.

``throughput_vs_diffusers`` = ours_fused images/s / diffusers images/s.

Usage::

    python benchmarks/gpu_throughput.py --out benchmarks/results/gpu_throughput.json
    python benchmarks/gpu_throughput.py --tiny --out /tmp/gpu_throughput.json   # CPU smoke run
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import (CASES, SD_BETAS, TINY_CASES, Results, base_row, grid, machine_info, make_case, med,  # noqa: E402
                        noise, sigma_scale, state_shape, summary, time_ms)

from epd.graphs import CUDAGraphDenoiser, GraphedEPDSampler, GraphedEulerSampler  # noqa: E402
from epd.table import uniform_table  # noqa: E402
from epd.solvers import solve, steps_for_nfe  # noqa: E402

NFE = 10


def build_pipeline(case):
    """diffusers' pipeline around the case's network (no text encoders, no VAE: embeddings in, latents out)."""
    import diffusers as d

    if case.name == "sd15":
        sched = d.DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        pipe = d.StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=case.model, scheduler=sched,
                                         safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif case.name == "sd3":
        sched = d.FlowMatchEulerDiscreteScheduler(shift=3.0)
        pipe = d.StableDiffusion3Pipeline(transformer=case.model, scheduler=sched, vae=None, text_encoder=None,
                                          tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                          tokenizer_3=None)
    else:
        sched = d.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                  base_image_seq_len=256, max_image_seq_len=4096)
        pipe = d.FluxPipeline(scheduler=sched, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                              tokenizer_2=None, transformer=case.model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_kwargs(case, nfe: int) -> dict:
    T = case.cond.tensors
    kw = {"height": case.res, "width": case.res, "num_inference_steps": nfe, "output_type": "latent",
          "guidance_scale": case.spec["cfg"]}
    if case.name == "sd15":
        kw.update(prompt_embeds=T["cond"], negative_prompt_embeds=T["uncond"])
    elif case.name == "sd3":
        kw.update(prompt_embeds=T["embeds"], pooled_prompt_embeds=T["pooled"], negative_prompt_embeds=T["neg_embeds"],
                  negative_pooled_prompt_embeds=T["neg_pooled"])
    else:
        kw.update(prompt_embeds=T["embeds"], pooled_prompt_embeds=T["pooled"])
    return kw


def scheduler_grid(case, pipe, nfe: int) -> torch.Tensor:
    """The pipeline scheduler's grid in our coordinates (EDM sigmas for SD1.5, flow time for SD3/FLUX), on CPU."""
    sched = pipe.scheduler
    if case.name == "sd15":
        sched.set_timesteps(nfe)
        ac = sched.alphas_cumprod.to(torch.float64)
        ts = sched.timesteps.long()
        s = ((1 - ac[ts]) / ac[ts]).sqrt()
        final = ((1 - sched.final_alpha_cumprod) / sched.final_alpha_cumprod).sqrt().to(torch.float64).reshape(1)
        return torch.cat([s, final]).float()
    if case.name == "sd3":
        sched.set_timesteps(nfe)
        return sched.sigmas.float().cpu()
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    seq = state_shape(case.name, case.res, case.spec)[0]
    c = sched.config
    mu = calculate_shift(seq, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    sched.set_timesteps(sigmas=[1.0 - i * (1.0 - 1.0 / nfe) / max(nfe - 1, 1) for i in range(nfe)], mu=mu)
    return sched.sigmas.float().cpu()


def measure_throughput(case, machine: dict, results: Results | None, nfe: int = NFE, reps: int | None = None) -> dict:
    """Images/s of the four paths for the case's image batch; returns the row."""
    reps = reps or (2 if case.tiny else (3 if case.res >= 1024 else 5))
    pipe = build_pipeline(case)
    kw = pipeline_kwargs(case, nfe)
    grid_cpu = scheduler_grid(case, pipe, nfe)
    shape = state_shape(case.name, case.res, case.spec)
    seeds = list(range(case.B))
    scale = sigma_scale(case.name, grid_cpu)

    def diffusers_run():
        pipe(generator=torch.Generator("cpu").manual_seed(0), **kw)

    eul = GraphedEulerSampler(case.den, check_finite=False)
    gden = CUDAGraphDenoiser(case.den)
    n_epd = steps_for_nfe("epd", nfe, afs=False)
    epd = GraphedEPDSampler(case.den, uniform_table(n_epd, 2), afs=False, check_finite=False)
    epd_grid = grid(case.name, n_epd, "cpu")

    paths = {
        "diffusers": diffusers_run,
        "ours_fused": lambda: eul.run(noise(shape, seeds, case.device, scale), grid_cpu, case.cond),
        "ours_solve": lambda: solve("euler", gden, noise(shape, seeds, case.device, scale), grid_cpu, cond=case.cond),
        "epd_k2": lambda: epd.run(noise(shape, seeds, case.device, sigma_scale(case.name, epd_grid)), epd_grid,
                                  case.cond),
    }
    row = base_row(case, machine, gpus=1, nfe=nfe, solver="euler (DDIM / flow-matching Euler)",
                   scheduler=type(pipe.scheduler).__name__, grid_points=len(grid_cpu), epd_grid_points=n_epd,
                   includes="noise + denoising loop to final latents (no text encoders, no VAE decode)")
    ips = {}
    with torch.no_grad():
        for name, fn in paths.items():
            try:
                t = time_ms(fn, case.device, 1, reps)
                ips[name] = case.B / (med(t) / 1e3)
                row[f"{name}_ms"] = summary(t)
                row[f"{name}_images_per_s"] = ips[name]
            except Exception as e:  # noqa: BLE001 (record and go on)
                row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    d = ips.get("diffusers")
    row["throughput_vs_diffusers"] = ips["ours_fused"] / d if d and "ours_fused" in ips else None
    row["solve_path_throughput_vs_diffusers"] = ips["ours_solve"] / d if d and "ours_solve" in ips else None
    row["epd_k2_throughput_vs_diffusers"] = ips["epd_k2"] / d if d and "epd_k2" in ips else None
    if results is not None:
        results.add(row)
    del pipe, eul, gden, epd
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="toy configs on the CPU (smoke test)")
    ap.add_argument("--cases", default=None, help="comma list backbone:resolution")
    ap.add_argument("--nfe", type=int, default=NFE)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if not args.tiny and device.type != "cuda":
        ap.error("full-size architectures need a CUDA device; use --tiny on the CPU")
    if args.tiny:
        torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    cases = TINY_CASES if args.tiny else CASES
    if args.cases:
        cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases.split(",")]
    machine = machine_info(device)
    res = Results(args.out, "gpu_throughput", machine, tiny=args.tiny)
    for name, r in cases:
        try:
            measure_throughput(make_case(name, r, device, tiny=args.tiny), machine, res, nfe=args.nfe)
        except Exception as e:  # noqa: BLE001
            res.add({"backbone": name, "resolution": r, "gpu": machine["gpu"], "error": f"{type(e).__name__}: {e}"[:400]})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    res.write(complete=True)
    for row in res.doc["rows"]:
        v = row.get("throughput_vs_diffusers")
        print(row["backbone"], row["resolution"], "ours/diffusers", "-" if v is None or math.isnan(v) else round(v, 3))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
