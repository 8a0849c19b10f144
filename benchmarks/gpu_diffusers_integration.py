"""Issue 21: per-image latency of an EPD table in stock diffusers pipelines, batch 1, full-size random weights.

    python benchmarks/gpu_diffusers_integration.py --weights DIR [--backbones sd15,sd3,flux] \
        [--out benchmarks/results/gpu_diffusers_integration.json]

For each backbone (SD1.5 512 px, SD3-Medium 1024 px, FLUX.1-dev 1024 px) the released pipeline class is loaded from
a weights root written by ``epd weights fake --size full`` (``--weights``; without it the script writes one into a
temporary folder first), and one prompt is sampled, text encoding and VAE decoding included, along four paths:

* ``stock_default`` — the pipeline with the scheduler of its folder at its default ``num_inference_steps``;
* ``stock_euler_equal_nfe`` — diffusers' Euler scheduler with as many steps as the EPD table's NFE (``2 (N - 1)``);
* ``epd_scheduler`` — ``pipe.scheduler = EPDScheduler.from_table(...)``, the K points one call each;
* ``apply_epd`` — ``apply_epd(pipe, table)``, the K points of a step in one call.

The table has the released tables' shape (N = 11, K = 2 for SD1.5 and SD3; N = 9, K = 2 for FLUX) with uniform
values (latency does not depend on them). Each path runs once to warm up, then ``--repeats`` times; rows
``{backbone, resolution, path, nfe, ms_per_image, gpu, ...}`` where ``nfe`` is the denoiser network calls of one
image, counted by a hook during the warm-up run (classifier-free guidance batched inside a call). ``--size tiny``
(CPU, 64 px, tiny random weights) is the smoke test.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_common import Results, machine_info, summary, sync, time_ms  # noqa: E402

from epd.backbones import backbone_class  # noqa: E402
from epd.backbones.weights import REGISTRY  # noqa: E402
from epd.table import uniform_table  # noqa: E402

BACKBONES = ("sd15", "sd3", "flux")
RESOLUTION = {"full": {"sd15": 512, "sd3": 1024, "flux": 1024}, "tiny": {"sd15": 64, "sd3": 64, "flux": 64}}
TABLE_SHAPE = {"sd15": (11, 2), "sd3": (11, 2), "flux": (9, 2)}  # (N, K) of the original's released tables
PATHS = ("stock_default", "stock_euler_equal_nfe", "epd_scheduler", "apply_epd")
PROMPT = "a photo of an astronaut riding a horse on the moon"
INCLUDES = "text encoding, the denoising loop and VAE decoding of one image (output_type='pt'), batch 1"


def load_pipeline(name: str, weights: Path, device: torch.device, dtype: torch.dtype):
    """The released pipeline class from ``weights/<registry folder>`` (local files only)."""
    import diffusers

    cls = backbone_class(name)
    folder = weights / REGISTRY[("backbone", cls.weights_name)].rel
    if not (folder / "model_index.json").is_file():
        raise SystemExit(f"--weights: {folder} holds no diffusers folder; write one with "
                         f"`epd weights fake --size full --backbones {name} --out {weights}`")
    pipe = getattr(diffusers, cls.pipeline_class).from_pretrained(str(folder), torch_dtype=dtype,
                                                                   local_files_only=True, **cls.pipeline_kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def epd_table(name: str, res: int, guidance: float):
    N, K = TABLE_SHAPE[name]
    schedule = "flowmatch" if backbone_class(name).flow else "discrete"
    return uniform_table(N, K, meta={"backbone": name, "schedule_type": schedule, "guidance_rate": guidance,
                                     "img_resolution": res})


def path_runners(name: str, pipe, table, res: int, guidance: float) -> dict:
    """path -> (callable sampling one image, scheduler label, steps)."""
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    from epd.diffusers import EPDScheduler, apply_epd

    stock = pipe.scheduler
    euler_cls = FlowMatchEulerDiscreteScheduler if backbone_class(name).flow else EulerDiscreteScheduler
    euler = euler_cls.from_config(stock.config)
    epd = EPDScheduler.from_table(table, stock.config)
    default_steps = inspect.signature(type(pipe).__call__).parameters["num_inference_steps"].default
    N = table.num_steps
    wrapped = apply_epd(pipe, table)
    gen = lambda: torch.Generator("cpu").manual_seed(0)  # noqa: E731
    kw = dict(guidance_scale=guidance, height=res, width=res, output_type="pt")

    def with_scheduler(sched, steps):
        def run():
            pipe.scheduler = sched
            try:
                return pipe(PROMPT, num_inference_steps=steps, generator=gen(), **kw).images
            finally:
                pipe.scheduler = stock
        return run

    return {"stock_default": (with_scheduler(stock, default_steps), type(stock).__name__, default_steps),
            "stock_euler_equal_nfe": (with_scheduler(euler, 2 * (N - 1)), euler_cls.__name__, 2 * (N - 1)),
            "epd_scheduler": (with_scheduler(epd, N - 1), "EPDScheduler", N - 1),
            "apply_epd": (lambda: wrapped(PROMPT, generator=gen(), **kw).images, "apply_epd", N - 1)}


def measure(fn, model, device: torch.device, repeats: int) -> tuple[int, list[float]]:
    """Network calls of one run (counted during the warm-up) and the timed repeats in ms."""
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        fn()
        sync(device)
    finally:
        hook.remove()
    return len(calls), time_ms(fn, device, warmup=0, reps=repeats)


def run_backbone(name: str, args, weights: Path, device: torch.device, machine: dict, doc: Results) -> None:
    cls = backbone_class(name)
    dtype = torch.float32 if args.size == "tiny" else cls.default_dtype
    res = RESOLUTION[args.size][name]
    t0 = time.perf_counter()
    pipe = load_pipeline(name, weights, device, dtype)
    load_s = time.perf_counter() - t0
    guidance = cls.Settings().guidance_scale
    table = epd_table(name, res, guidance)
    model = getattr(pipe, "unet", None) or pipe.transformer
    repeats = args.repeats or (1 if args.size == "tiny" else 2 if res >= 1024 else 3)
    with torch.no_grad():
        for path, (fn, scheduler, steps) in path_runners(name, pipe, table, res, guidance).items():
            if args.paths and path not in args.paths:
                continue
            base = {"backbone": name, "resolution": res, "path": path, "gpu": machine["gpu"], "batch": 1,
                    "dtype": str(dtype).replace("torch.", ""), "scheduler": scheduler, "steps": steps,
                    "N": table.num_steps, "K": table.num_points, "guidance_scale": guidance,
                    "load_s": round(load_s, 2)}
            try:
                nfe, ms = measure(fn, model, device, repeats)
                row = doc.add({**base, "nfe": nfe, "ms_per_image": round(summary(ms)["median_ms"], 3),
                               **{k: v for k, v in summary(ms).items() if k != "median_ms"}})
                print(f"{name} {res} {path:22} NFE {nfe:3d}  {row['ms_per_image']:10.1f} ms/image", flush=True)
            except Exception as e:  # noqa: BLE001  (a failed path is a row, the others still run)
                doc.add({**base, "error": f"{type(e).__name__}: {e}"[:400]})
                print(f"{name} {res} {path}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    del pipe, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _names(text: str, known: tuple[str, ...], flag: str, ap) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        ap.error(f"{flag}: expected names among {', '.join(known)}, got {text!r}")
    return names


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, default=None,
                    help="weights root written by `epd weights fake` (default: write one into a temporary folder)")
    ap.add_argument("--size", choices=("full", "tiny"), default="full",
                    help="full: released architectures on a GPU; tiny: tiny models at 64 px on the CPU (smoke test)")
    ap.add_argument("--backbones", default=",".join(BACKBONES), help="comma list among " + ", ".join(BACKBONES))
    ap.add_argument("--paths", default=None, help="comma list among " + ", ".join(PATHS) + " (default: all)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per path (default 3, 2 at 1024 px)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_diffusers_integration.json")
    args = ap.parse_args(argv)
    names = _names(args.backbones, BACKBONES, "--backbones", ap)
    args.paths = _names(args.paths, PATHS, "--paths", ap) if args.paths else None
    if args.repeats is not None and args.repeats < 1:
        ap.error(f"--repeats: must be >= 1, got {args.repeats}")
    device = torch.device("cuda" if torch.cuda.is_available() and args.size == "full" else "cpu")
    if args.size == "full" and device.type != "cuda":
        ap.error("--size full needs a CUDA device; use --size tiny on the CPU")
    if args.size == "tiny":
        torch.set_num_threads(1)  # tiny models on a shared CPU: more threads only contend
    machine = machine_info(device)
    doc = Results(args.out, "gpu_diffusers_integration", machine, size=args.size, includes=INCLUDES,
                  table_shapes={n: {"N": TABLE_SHAPE[n][0], "K": TABLE_SHAPE[n][1]} for n in names})
    with tempfile.TemporaryDirectory(prefix="epd-fake-weights-") as tmp:
        weights = args.weights
        if weights is None:
            from epd.fake_weights import write_fake_weights

            weights = Path(tmp)
            write_fake_weights(weights, args.size, backbones=names, scorers=[])
        for name in names:
            run_backbone(name, args, weights, device, machine, doc)
    doc.write(complete=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
