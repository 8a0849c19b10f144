"""Per-step latency and peak memory of a complete EPD sample on the full-size SD1.5 / SD3-Medium / FLUX.1-dev
architectures with random weights (no downloads; no text encoders or VAE: random embeddings of the right shapes).

For each (backbone, resolution) the denoising network is built directly on the GPU in its CUDA dtype (SD1.5 and
SD3 float16, FLUX bfloat16, as the original), wrapped by the project's adapter (CFG inside, K points in one
call), and sampled with the EPD solver on the original's grid (N = 11 for SD1.5/SD3, N = 9 for FLUX) with a
uniform cold-start table, for K = 1, 2, 3. One warm-up sample is excluded; ``step_ms`` is the median over the
timed samples of one coarse EPD step (one probe call plus one call over the K stacked points), measured with CUDA
events; ``peak_memory_gb`` is ``torch.cuda.max_memory_allocated`` during the timed samples (weights included;
``weights_gb`` is what the weights alone hold). Random weights may overflow in half precision; outputs are then
cleaned with ``nan_to_num`` (counted in ``nonfinite_calls``) so that timing still covers the full computation.

Usage (one GPU, < 8 minutes on an H100)::

    python benchmarks/backbone_latency.py --out benchmarks/results/backbone_latency_h100.json
    python benchmarks/backbone_latency.py --tiny --out /tmp/backbone_latency_tiny.json   # CPU smoke mode

The JSON is ``{"machine": {...}, "rows": [...], "complete": bool}``, rewritten atomically after every row. Each row
holds ``backbone, resolution, K, peak_memory_gb, step_ms, gpu`` (the records interface) plus driver/torch/diffusers
versions, dtype, batch, num_points, step_ms_all, sample_ms, nfe, forward_passes, weights_gb, nonfinite_calls; a row
that ran out of memory has ``error`` set and null timings.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from epd.io import atomic_write_json  # noqa: E402
from epd.table import uniform_table  # noqa: E402
from epd.solvers import solve  # noqa: E402

# Architectures of the released checkpoints (their config.json), built with random weights.
FULL = {
    "sd15": {"class": "UNet2DConditionModel", "dtype": torch.float16, "num_points": 11,
             "config": {"sample_size": 64, "cross_attention_dim": 768},  # the rest are SD1.x defaults
             "embeds": (77, 768), "pooled": None},
    "sd3": {"class": "SD3Transformer2DModel", "dtype": torch.float16, "num_points": 11,
            "config": {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24,
                       "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
                       "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "out_channels": 16,
                       "pos_embed_max_size": 192},
            "embeds": (77 + 256, 4096), "pooled": 2048},
    "flux": {"class": "FluxTransformer2DModel", "dtype": torch.bfloat16, "num_points": 9,
             "config": {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                        "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                        "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]},
             "embeds": (512, 4096), "pooled": 768},
}
TINY = {
    "sd15": {**FULL["sd15"], "dtype": torch.float32,
             "config": {"block_out_channels": (4, 8), "layers_per_block": 1, "sample_size": 8, "norm_num_groups": 2,
                        "cross_attention_dim": 32, "attention_head_dim": 2,
                        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
                        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D")}, "embeds": (77, 32)},
    "sd3": {**FULL["sd3"], "dtype": torch.float32,
            "config": {"sample_size": 8, "patch_size": 2, "in_channels": 4, "num_layers": 1, "attention_head_dim": 8,
                       "num_attention_heads": 4, "caption_projection_dim": 32, "joint_attention_dim": 32,
                       "pooled_projection_dim": 64, "out_channels": 4, "pos_embed_max_size": 16},
            "embeds": (77 + 16, 32), "pooled": 64},
    "flux": {**FULL["flux"], "dtype": torch.float32,
             "config": {"patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 1,
                        "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
                        "pooled_projection_dim": 32, "guidance_embeds": True, "axes_dims_rope": [4, 4, 8]},
             "embeds": (16, 32), "pooled": 32},
}
CASES = (("sd15", 512), ("sd3", 512), ("sd3", 1024), ("flux", 512), ("flux", 1024))
TINY_CASES = (("sd15", 64), ("sd3", 64), ("sd3", 128), ("flux", 64), ("flux", 128))


class _FiniteDenoiser:
    """Pass-through denoiser that replaces NaN/inf of random half-precision weights and counts such calls."""

    def __init__(self, inner):
        self.inner, self.coords, self.passes_per_eval = inner, inner.coords, inner.passes_per_eval
        self.nonfinite = 0

    def __call__(self, x, sigma, cond=None):
        out = self.inner(x, sigma, cond)
        if not torch.isfinite(out).all():
            self.nonfinite += 1
            out = torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
        return out


def build_network(name: str, spec: dict, device: str):
    """Instantiate the denoising network directly on ``device`` in ``spec['dtype']`` (random init, no fp32 copy)."""
    import diffusers

    cls = getattr(diffusers, spec["class"])
    prev = torch.get_default_dtype()
    torch.set_default_dtype(spec["dtype"])
    try:
        with torch.device(device):
            net = cls(**spec["config"]).to(device)  # stray CPU buffers, if any
    finally:
        torch.set_default_dtype(prev)
    return net.eval().requires_grad_(False)


def adapter(name: str, net, resolution: int, device: str):
    from epd.backbones.flux import FluxBackbone
    from epd.backbones.sd3 import SD3Backbone
    from epd.backbones.sd15 import SD15Backbone

    cfg = {"resolution": resolution}
    if name == "sd15":
        return SD15Backbone.from_components(net, config=cfg, device=device)
    if name == "sd3":
        return SD3Backbone.from_components(net, config=cfg, device=device)
    return FluxBackbone.from_components(net, config=cfg, device=device)


def conditioning(name: str, bb, spec: dict, batch: int):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(batch, *spec["embeds"], generator=g)
    if name == "sd15":
        return bb.prepare_embeds(emb, torch.randn(emb.shape, generator=g))
    pooled = torch.randn(batch, spec["pooled"], generator=g)
    if name == "sd3":
        neg, neg_pooled = torch.randn(emb.shape, generator=g), torch.randn(pooled.shape, generator=g)
        return bb.prepare_embeds(emb, pooled, neg, neg_pooled)
    return bb.prepare_embeds(emb, pooled)


def _timed_sample(bb, den, x, sigmas, cond, table, cuda: bool):
    """One EPD sample; returns (per-step ms list, total ms, SolverOutput)."""
    marks = []

    def mark(_info=None):
        if cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            marks.append(ev)
        else:
            marks.append(time.perf_counter())

    mark()
    out = solve("epd", den, x, sigmas, cond=cond, table=table, callback=mark)
    if cuda:
        torch.cuda.synchronize()
        steps = [a.elapsed_time(b) for a, b in zip(marks[:-1], marks[1:])]
    else:
        steps = [(b - a) * 1e3 for a, b in zip(marks[:-1], marks[1:])]
    return steps, sum(steps), out


def _max_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def machine_info(device: str) -> dict:
    import diffusers

    info = {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
            "host": platform.node(), "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            info["driver"] = None
    else:
        info["gpu"] = f"cpu ({platform.processor() or platform.machine()})"
        info["driver"] = None
    return info


def run_case(name: str, resolution: int, net, spec: dict, ks, args, device: str, machine: dict, write) -> None:
    cuda = device.startswith("cuda")
    bb = adapter(name, net, resolution, device)
    cond = conditioning(name, bb, spec, args.batch)
    n = args.num_points or spec["num_points"]
    sigmas = bb.sigmas(n)  # the original's grid (discrete / flowmatch)
    weights_gb = torch.cuda.memory_allocated() / 2**30 if cuda else None
    for k in ks:
        row = {"backbone": name, "resolution": resolution, "K": k, "batch": args.batch, "num_points": n,
               "dtype": str(spec["dtype"]).replace("torch.", ""), "gpu": machine["gpu"], "driver": machine["driver"],
               "torch": machine["torch"], "diffusers": machine["diffusers"], "weights_gb": weights_gb,
               "peak_memory_gb": None, "step_ms": None, "error": None}
        try:
            table = uniform_table(n, k)
            den = _FiniteDenoiser(bb.denoiser)
            x = bb.noise(list(range(args.batch)))
            _timed_sample(bb, den, x, sigmas, cond, table, cuda)  # warm-up (kernel selection, allocator)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            steps, totals = [], []
            for _ in range(args.repeats):
                s, total, out = _timed_sample(bb, den, x, sigmas, cond, table, cuda)
                steps += s
                totals.append(total)
            row.update(step_ms=statistics.median(steps), step_ms_all=[round(v, 3) for v in steps],
                       sample_ms=statistics.median(totals), nfe=out.nfe, paper_nfe=out.paper_nfe,
                       forward_passes=out.forward_passes, nonfinite_calls=den.nonfinite,
                       peak_memory_gb=(torch.cuda.max_memory_allocated() / 2**30) if cuda else _max_rss_gb(),
                       peak_memory_kind="cuda max_memory_allocated" if cuda else "process max RSS (CPU)")
        except torch.cuda.OutOfMemoryError as e:
            row["error"] = f"CUDA out of memory: {str(e).splitlines()[0][:200]}"
        except RuntimeError as e:  # e.g. kernels unavailable for a dtype: record and go on
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        finally:
            if cuda:
                torch.cuda.empty_cache()
        print(f"{name:5s} {resolution:5d}px K={k}: step {row['step_ms'] and round(row['step_ms'], 2)} ms, "
              f"peak {row['peak_memory_gb'] and round(row['peak_memory_gb'], 2)} GB"
              + (f"  ERROR {row['error']}" if row["error"] else ""), flush=True)
        write(row)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write (rewritten atomically after every row)")
    ap.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (smoke test of this script)")
    ap.add_argument("--cases", default=None, help="comma list of backbone:resolution, e.g. sd3:1024,flux:1024")
    ap.add_argument("--ks", default="1,2,3", help="parallel points K to measure")
    ap.add_argument("--batch", type=int, default=1, help="images per sample")
    ap.add_argument("--repeats", type=int, default=2, help="timed samples per row (after one warm-up)")
    ap.add_argument("--num-points", type=int, default=None, help="grid points N (default: 11 SD1.5/SD3, 9 FLUX)")
    ap.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    args = ap.parse_args(argv)

    device = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if not args.tiny and not device.startswith("cuda"):
        ap.error("full-size architectures need a CUDA device; use --tiny for a CPU smoke run")
    specs = TINY if args.tiny else FULL
    cases = TINY_CASES if args.tiny else CASES
    if args.cases:
        cases = tuple((c.split(":")[0], int(c.split(":")[1])) for c in args.cases.split(","))
        bad = [c for c, _ in cases if c not in specs]
        if bad:
            ap.error(f"--cases: unknown backbone(s) {bad}; accepted: {sorted(specs)}")
    ks = [int(k) for k in args.ks.split(",")]
    if args.tiny:
        torch.set_num_threads(1)
    machine = machine_info(device)
    doc = {"benchmark": "backbone_latency", "tiny": args.tiny, "machine": machine, "rows": [], "complete": False,
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def write(row=None):
        if row is not None:
            doc["rows"].append(row)
        atomic_write_json(args.out, doc)

    t0 = time.time()
    for name in dict.fromkeys(c for c, _ in cases):  # build each network once, in case order
        spec = specs[name]
        t_build = time.time()
        try:
            net = build_network(name, spec, device)
        except torch.cuda.OutOfMemoryError as e:
            for _, res in (c for c in cases if c[0] == name):
                for k in ks:
                    write({"backbone": name, "resolution": res, "K": k, "gpu": machine["gpu"], "peak_memory_gb": None,
                           "step_ms": None, "error": f"CUDA out of memory building the network: {str(e)[:200]}"})
            continue
        params = sum(p.numel() for p in net.parameters())
        print(f"{name}: {spec['class']} with {params / 1e6:.1f}M parameters ({spec['dtype']}), "
              f"built in {time.time() - t_build:.1f}s", flush=True)
        for _, res in (c for c in cases if c[0] == name):
            run_case(name, res, net, spec, ks, args, device, machine, write)
        del net
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    doc["complete"] = True
    doc["elapsed_s"] = round(time.time() - t0, 1)
    write()
    print(f"wrote {args.out} ({len(doc['rows'])} rows, {doc['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
