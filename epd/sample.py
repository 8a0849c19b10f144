"""``epd sample``: sample images with any solver or EPD snapshot.

Flags follow the original ``sample.py`` where they overlap (``--predictor_path``, ``--seeds 0-63``, ``--batch``,
``--prompt``, ``--prompt-file``, ``--outdir``, ``--grid``, ``--subdirs``). Each image ``NNNNNN.png`` (the seed)
gets a sidecar ``NNNNNN.json`` with solver, NFE, forward passes, seed and prompt, which ``epd evaluate`` uses to
pair images with prompts. Images already present with a matching sidecar are skipped, so an interrupted run
resumes; every file is written under a temporary name first.
"""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .errors import ConfigError, EPDError
from .io import atomic_path, atomic_write_json, config_hash, parse_seeds, read_json
from .memory import out_of_memory_names
from .predictor import load as load_table
from .prompts import pair, resolve_prompts
from .solvers import TABLE_SOLVERS, solve
from .solvers.learned import load_grid
from .study import resolve_grid
from .table import check_compatible

log = logging.getLogger(__name__)

__all__ = ["make_denoiser", "sample_batch", "sample_to_dir", "save_png", "machine_label"]


def save_png(img: torch.Tensor, path: Path) -> None:
    """Save a ``(3, H, W)`` image in ``[0, 1]`` as 8-bit RGB PNG, atomically."""
    from PIL import Image

    arr = (img.clamp(0, 1).permute(1, 2, 0).cpu().float().numpy() * 255 + 0.5).astype(np.uint8)
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def make_denoiser(backbone, cuda_graphs: str = "auto"):
    """The denoiser ``epd sample`` runs: the backbone's, replayed as CUDA graphs when asked and possible.

    Args:
        backbone: a loaded backbone.
        cuda_graphs (`str`): ``"on"``, ``"off"`` or ``"auto"`` (on when the backbone lives on a CUDA device and
            does not declare ``graph_safe = False``).
            A graphed denoiser checks NaN/inf once on the final state instead of after every call (a per-call
            check would synchronise with the host at each step).
    """
    if cuda_graphs not in ("auto", "on", "off"):
        raise ConfigError(f"--cuda-graphs: expected auto, on or off, got {cuda_graphs!r}")
    on_cuda = torch.device(getattr(backbone, "device", "cpu")).type == "cuda"
    if cuda_graphs == "off" or (cuda_graphs == "auto" and not (on_cuda and getattr(backbone, "graph_safe", True))):
        return backbone.denoiser
    if not on_cuda:
        raise ConfigError("--cuda-graphs on: CUDA graphs need --device cuda")
    from .graphs import CUDAGraphDenoiser

    return CUDAGraphDenoiser(backbone.denoiser)


@torch.no_grad()
def sample_batch(backbone, solver: str, seeds: list[int], prompts: list[str], sigmas: torch.Tensor, table=None,
                 *, denoiser=None, **solver_kw):
    """Sample one batch; returns ``(final states, images, SolverOutput)``.

    Args:
        denoiser: what to evaluate instead of ``backbone.denoiser`` (e.g. from :func:`make_denoiser`).
    """
    x = backbone.noise(seeds, sigma=float(sigmas[0]))  # a grid may start below sigma_max (diffusers' leading)
    cond = backbone.prepare(prompts)
    kw = dict(solver_kw)
    if solver in TABLE_SOLVERS:
        kw["table"] = table
    kw.setdefault("context", [f"seed {s}, prompt {p!r}" for s, p in zip(seeds, prompts)])
    out = solve(solver, denoiser or backbone.denoiser, x, sigmas.to(x.dtype), cond=cond, **kw)
    return out.x, backbone.decode(out.x), out


def sample_to_dir(backbone, *, solver: str, seeds: list[int], prompts: list[str], outdir: str | Path,
                  sigmas: torch.Tensor, table=None, batch: int = 64, subdirs: bool = False, grid: bool = False,
                  save_latents: bool = False, label: str | None = None, extra: dict | None = None,
                  denoiser=None, write: bool = True, barrier=None, started: float | None = None) -> dict:
    """Sample every seed into ``outdir`` (resuming), write sidecars and a ``summary.json``; returns the summary.

    The summary records the cost: ``seconds`` (wall clock of this call), ``seconds_per_image`` (that time over the
    images this call sampled, at this ``batch``) and ``machine`` (the device it ran on); a call that only resumed
    keeps the recorded cost of the call that sampled.

    Args:
        prompts: one prompt per seed, or a list cycled over the seeds.
        denoiser: replaces ``backbone.denoiser`` (see :func:`make_denoiser`).
        write (`bool`): ``False`` computes without writing (the non-zero ranks of point-parallel sampling, which
            must run the same loop as rank 0).
        barrier: called once every rank has decided which seeds to skip, before anything is written.
        started (`float`, *optional*): wall-clock start for ``seconds`` in the summary (default: now); given, the
            whole of ``seeds`` counts as sampled since then (the final pass of a multi-rank run).
    """
    if batch < 1:
        raise ConfigError(f"--batch: must be >= 1, got {batch}")
    outdir = Path(outdir)
    if write:
        outdir.mkdir(parents=True, exist_ok=True)
    label = label or solver
    info = {"solver": label, "base_solver": solver, "num_points": len(sigmas), "sigmas": sigmas.tolist(),
            "grid_hash": config_hash([round(float(v), 12) for v in sigmas.tolist()]), "backbone": backbone.name,
            **({"table_hash": _table_hash(table)} if table is not None else {}), **(extra or {})}
    t0 = time.time() if started is None else started
    todo, counts = _pending(outdir, seeds, pair(prompts, seeds), info, subdirs, save_latents)
    if barrier is not None:
        barrier()
    latents = {}
    for start in tqdm(range(0, len(todo), batch), desc=f"sample {label}", unit="batch", disable=not todo):
        chunk = todo[start:start + batch]
        with out_of_memory_names("sample.batch (epd sample --batch)", batch, f"sampling {label}"):
            x, imgs, out = sample_batch(backbone, solver, [c[0] for c in chunk], [c[1] for c in chunk], sigmas,
                                        table, denoiser=denoiser)
        if imgs.dim() != 4 or imgs.shape[1] != 3:
            raise EPDError(f"backbone {backbone.name}: decodes to shape {tuple(imgs.shape)}, not RGB images "
                           "(B, 3, H, W); `epd sample` writes images, use `epd teacher` or the library for this one")
        counts = {"nfe": out.paper_nfe, "nfe_sequential": out.nfe, "forward_passes": out.forward_passes}
        if write:
            _write_batch(outdir, chunk, imgs, x, counts, info, subdirs, latents if save_latents else None)
    if not write:
        return {"count": len(todo), **counts}
    if save_latents and latents:
        _write_latents(outdir / "latents.safetensors", latents)
    if grid:
        _write_grid(outdir, seeds[:64], subdirs)
    seconds = round(time.time() - t0, 2)
    summary = {**info, "seeds": f"{seeds[0]}-{seeds[-1]}", "count": len(seeds), **counts, "seconds": seconds,
               **_cost(outdir, seconds, len(todo) if started is None else len(seeds), batch, backbone)}
    atomic_write_json(outdir / "summary.json", summary)
    return summary


def _pending(outdir: Path, seeds: list[int], paired: list[str], info: dict, subdirs: bool,
             save_latents: bool) -> tuple[list[tuple[int, str]], dict]:
    """The (seed, prompt) pairs still to sample, and the NFE counts recorded by the images already there (each
    checked to come from the same settings)."""
    counts = {"nfe": None, "nfe_sequential": None, "forward_passes": None}
    todo = []
    for s, p in zip(seeds, paired):
        png = _png_path(outdir, s, subdirs)
        side = png.with_suffix(".json")
        if png.exists() and side.exists() and not save_latents:
            meta = read_json(side)
            _check_same_run(side, meta, {**info, "seed": s, "prompt": p})
            counts = {k: meta[k] for k in counts}
            continue
        todo.append((s, p))
    return todo, counts


def _write_batch(outdir: Path, chunk: list, imgs: torch.Tensor, x: torch.Tensor, counts: dict, info: dict,
                 subdirs: bool, latents: dict | None) -> None:
    """One PNG and sidecar JSON per image of a batch; final states into ``latents`` when collecting them."""
    for i, (s, p) in enumerate(chunk):
        png = _png_path(outdir, s, subdirs)
        save_png(imgs[i], png)
        atomic_write_json(png.with_suffix(".json"), {
            "seed": s, "prompt": p, "solver": info["solver"], "nfe": counts["nfe"],
            "nfe_sequential": counts["nfe_sequential"], "forward_passes": counts["forward_passes"],
            "image": png.name, **{k: v for k, v in info.items() if k != "sigmas"}})
        if latents is not None:
            latents[s] = x[i].float().cpu()


def _write_latents(path: Path, latents: dict) -> None:
    from safetensors.torch import save_file

    with atomic_path(path, suffix=".safetensors") as tmp:
        order = sorted(latents)
        save_file({"seeds": torch.tensor(order), "latents": torch.stack([latents[s] for s in order])}, str(tmp))


def machine_label(device) -> str:
    """The device a timing was taken on, in words: the GPU's name, or the CPU model and torch's thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def _cost(outdir: Path, seconds: float, sampled: int, batch: int, backbone) -> dict:
    """``seconds_per_image``, ``batch`` and ``machine`` of this call, or the ones recorded when it sampled nothing."""
    if sampled:
        return {"seconds_per_image": round(seconds / sampled, 5), "cost_batch": batch,
                "machine": machine_label(getattr(backbone, "device", "cpu"))}
    old = read_json(outdir / "summary.json") if (outdir / "summary.json").is_file() else {}
    return {k: old.get(k) for k in ("seconds_per_image", "cost_batch", "machine")}


_RUN_KEYS = ("seed", "prompt", "solver", "base_solver", "num_points", "grid_hash", "table_hash", "backbone")


def _table_hash(table) -> str:
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(table.tensors().items()):
        h.update(k.encode() + v.detach().double().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _check_same_run(side: Path, meta: dict, want: dict) -> None:
    """An image kept on resume must come from the same settings; otherwise refuse instead of mixing runs
    (keys missing from an older sidecar are not compared)."""
    diff = [k for k in _RUN_KEYS if k in want and k in meta and meta[k] != want[k]]
    if diff:
        k = diff[0]
        raise ConfigError(f"--outdir: {side} was written with other settings ({k}: {meta.get(k)!r}, this run: "
                          f"{want[k]!r}); a folder holds one run: choose another --outdir or remove this one")


def _png_path(outdir: Path, seed: int, subdirs: bool) -> Path:
    return (outdir / f"{seed - seed % 1000:06d}" if subdirs else outdir) / f"{seed:06d}.png"


def _write_grid(outdir: Path, seeds: list[int], subdirs: bool) -> None:
    from PIL import Image

    ims = [Image.open(_png_path(outdir, s, subdirs)).convert("RGB") for s in seeds]
    if not ims:
        return
    w, h = ims[0].size
    cols = int(np.ceil(np.sqrt(len(ims))))
    rows = int(np.ceil(len(ims) / cols))
    canvas = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(ims):
        canvas.paste(im, ((i % cols) * w, (i // cols) * h))
    scale = max(1, 256 // max(w, h))
    canvas = canvas.resize((cols * w * scale, rows * h * scale), Image.NEAREST)
    with atomic_path(outdir / "grid.png", suffix=".png") as tmp:
        canvas.save(tmp, format="PNG")


# ----------------------------------------------------------------------------------------------- CLI
def add_arguments(p):
    p.add_argument("--config", required=True)
    p.add_argument("--backbone", required=True, help="name of a backbone in the config")
    p.add_argument("--solver", default=None, help="solver name (default: epd when --predictor_path is given)")
    p.add_argument("--predictor_path", "--predictor-path", dest="predictor_path", default=None,
                   help="EPD snapshot (.safetensors/.json or the original's .pkl)")
    p.add_argument("--nfe", type=int, default=None, help="paper-NFE for a baseline solver")
    p.add_argument("--steps", type=int, default=None, help="number of steps for a baseline solver")
    p.add_argument("--schedule", default=None, help="schedule name (default: the backbone's)")
    p.add_argument("--sigmas", default=None, help="a learned time grid (grid.json of `epd peer ld3|gits`) for a "
                   "baseline solver; the solver defaults to the grid's base solver")
    p.add_argument("--seeds", default="0-63", help="seed range, e.g. 0-63 or 1,5,9-11")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt", default=None, help="one prompt for every seed")
    p.add_argument("--prompt-file", "--prompt_file", dest="prompt_file", default=None, help="txt or csv (text)")
    p.add_argument("--out", "--outdir", dest="outdir", required=True,
                   help="output folder (PNG per image, sidecar JSON, summary.json); --outdir is the original's name")
    p.add_argument("--label", default=None, help="solver label stored in sidecars (default: solver name)")
    p.add_argument("--grid", action="store_true", help="also write grid.png of the first 64 images")
    p.add_argument("--subdirs", action="store_true", help="group images in folders of 1000 seeds")
    p.add_argument("--save-latents", action="store_true", help="also write latents.safetensors (final states)")
    p.add_argument("--weights", default=None, help="trained backbone folder (embedded backbone)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cuda-graphs", default="auto", choices=["auto", "on", "off"],
                   help="replay each denoiser call as a CUDA graph (auto: on for CUDA devices)")
    p.add_argument("--gpus", type=int, default=1,
                   help="processes, one per GPU (with --device cpu: gloo ranks on the CPU, for testing)")
    p.add_argument("--parallel", default="seeds", choices=["seeds", "points"],
                   help="with --gpus > 1: shard the seeds over the ranks (throughput), or evaluate the K points of "
                        "every EPD step on different GPUs (latency)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a rank waits for a dead peer (--gpus > 1)")


def _learned_grid_solver(args, sec) -> str | None:
    """The base solver of ``--sigmas FILE`` (checked: readable, this backbone's, no table, no --nfe/--steps)."""
    if not getattr(args, "sigmas", None):
        return None
    if args.predictor_path or args.nfe is not None or args.steps is not None:
        raise ConfigError("--sigmas: the learned grid fixes the steps; drop --predictor_path, --nfe and --steps")
    grid = load_grid(args.sigmas, backbone=sec.get("kind"))
    if (args.solver or grid["solver"]) in TABLE_SOLVERS:
        raise ConfigError(f"--sigmas: a learned grid is for a baseline solver, not {args.solver!r}")
    return grid["solver"]


def _grid_extra(args) -> dict:
    return {"sigmas_file": args.sigmas} if getattr(args, "sigmas", None) else {}


def _setup(args):
    """Validate the arguments and resolve what every rank needs: (section, solver, table, prompts, seeds)."""
    from .config import backbone_section, load_config

    cfg = load_config(args.config)
    sec = backbone_section(cfg, args.backbone)
    grid_solver = _learned_grid_solver(args, sec)
    solver = args.solver or ("epd" if args.predictor_path else None) or grid_solver
    if solver is None:
        raise ConfigError("--solver: required unless --predictor_path or --sigmas is given")
    table = None
    if args.predictor_path:
        if solver not in TABLE_SOLVERS:
            raise ConfigError(f"--solver {solver} does not use a table; drop --predictor_path or use epd/epd_ipndm")
        table = load_table(args.predictor_path)
        check_compatible(table, backbone=sec.get("kind", args.backbone))
    elif solver in TABLE_SOLVERS:
        raise ConfigError(f"--predictor_path: solver {solver} needs an EPD snapshot")
    if args.prompt is not None and args.prompt_file is not None:
        raise ConfigError("give --prompt or --prompt-file, not both")
    prompts = [args.prompt] if args.prompt is not None else resolve_prompts(
        args.prompt_file or sec.get("prompts", {}).get("eval", "builtin:digits"))
    seeds = parse_seeds(args.seeds)
    gpus = int(getattr(args, "gpus", 1))
    if gpus < 1:
        raise ConfigError(f"--gpus: must be >= 1, got {gpus}")
    if gpus > 1:
        if str(args.device).startswith("cuda") and torch.cuda.device_count() < gpus:
            raise ConfigError(f"--gpus: asked for {gpus} GPUs but {torch.cuda.device_count()} are visible; "
                              f"use --gpus {max(torch.cuda.device_count(), 1)} or fewer")
        if args.parallel == "points":
            if table is None:
                raise ConfigError("--parallel points: spreads the K points of an EPD step; give --predictor_path, "
                                  "or use --parallel seeds for a baseline solver")
            if table.num_points % gpus:
                raise ConfigError(f"--parallel points: K={table.num_points} points do not split over --gpus {gpus}; "
                                  f"use a divisor of {table.num_points}, or --parallel seeds")
        if args.save_latents:
            raise ConfigError("--save-latents: not supported with --gpus > 1 (run on one GPU)")
    return sec, solver, table, prompts, seeds


def _sample(args, sec, solver, table, prompts, seeds, *, device, rank=0, world=1, started=None) -> dict:
    """Load the backbone on ``device`` and sample this rank's part (all of it on one rank)."""
    from .backbones import load_backbone

    bb = load_backbone(sec, device=device, weights_dir=args.weights)
    st = sec.get("student") or {}
    sigmas = load_grid(args.sigmas)["sigmas"] if getattr(args, "sigmas", None) else resolve_grid(
        bb, solver, nfe=args.nfe, steps=args.steps, table=table, schedule=args.schedule or st.get("schedule"),
        afs=bool(st.get("afs", True)))
    den = make_denoiser(bb, args.cuda_graphs)
    common = dict(solver=solver, outdir=args.outdir, sigmas=sigmas, table=table, batch=args.batch,
                  subdirs=args.subdirs, label=args.label or solver, extra={"predictor_path": args.predictor_path,
                                                                         **_grid_extra(args)})
    if world == 1:
        return sample_to_dir(bb, seeds=seeds, prompts=prompts, grid=args.grid, save_latents=args.save_latents,
                             denoiser=den, **common)
    import torch.distributed as dist

    paired = pair(prompts, seeds)
    if args.parallel == "points":  # SPMD: same seeds everywhere, rank r evaluates its share of each step's points
        from .parallel import PointParallelDenoiser

        return sample_to_dir(bb, seeds=seeds, prompts=paired, grid=args.grid, denoiser=PointParallelDenoiser(den),
                             write=rank == 0, barrier=dist.barrier, started=started, **common)
    mine = list(range(rank, len(seeds), world))  # seed sharding: each rank its own seeds, one file per seed
    sample_to_dir(bb, seeds=[seeds[i] for i in mine], prompts=[paired[i] for i in mine], denoiser=den, **common)
    dist.barrier()
    if rank == 0:  # every image is on disk: this pass only checks the sidecars and writes summary (and grid)
        return sample_to_dir(bb, seeds=seeds, prompts=paired, grid=args.grid, denoiser=den, started=started,
                             **common)
    return {}


def _rank_main(rank: int, args, setup: tuple, world: int, rendezvous: str, started: float, queue) -> None:
    from .parallel import init_point_parallel

    cuda = str(args.device).startswith("cuda")
    init_point_parallel(world, backend="nccl" if cuda else "gloo", rank=rank, timeout_s=args.timeout,
                        init_method=f"file://{rendezvous}")
    try:
        torch.set_num_threads(max(1, torch.get_num_threads() // world))
        out = _sample(args, *setup, device=f"cuda:{rank}" if cuda else args.device, rank=rank, world=world,
                      started=started)
        if rank == 0:
            queue.put(out)
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()


def _run_ranks(args, setup: tuple, world: int) -> dict:
    import tempfile

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    # file rendezvous: local ranks only, no port to pick (and no race for one)
    with tempfile.TemporaryDirectory(prefix="epd-ranks-") as tmp:
        try:
            mp.start_processes(_rank_main, args=(args, setup, world, str(Path(tmp) / "rendezvous"), time.time(), queue),
                               nprocs=world, join=True, start_method="spawn")
        except mp.ProcessRaisedException as e:
            raise EPDError(f"--gpus {world}: a rank failed:\n{e}") from None
        except mp.ProcessExitedException as e:
            raise EPDError(f"--gpus {world}: a rank died ({e}); the others stopped at the next collective") from None
    return queue.get()


def run(args):
    from . import tracking

    setup = _setup(args)  # (section, solver, table, prompts, seeds): validated once, the ranks receive it
    label = args.label or setup[1]
    world = int(getattr(args, "gpus", 1))
    tags = {"solver": label, "nfe": args.nfe if args.nfe is not None else "", "predictor": args.predictor_path or ""}
    params = {"seeds": args.seeds, "batch": args.batch, "gpus": world, "parallel": args.parallel if world > 1 else ""}
    with tracking.start_run("sample", backbone=args.backbone, tags=tags, params=params) as r:
        if world == 1:
            summary = _sample(args, *setup, device=args.device)
        else:
            summary = _run_ranks(args, setup, world)
        r.params({"num_points": summary["num_points"]})
        r.metrics({"nfe": summary["nfe"], "forward_passes": summary["forward_passes"], "seconds": summary["seconds"],
                   **({"seconds_per_image": summary["seconds_per_image"]} if summary.get("seconds_per_image") else {})})
    print(f"{summary['count']} images ({label}, NFE {summary['nfe']}, {summary['forward_passes']} forward passes) "
          f"-> {args.outdir}")
    return 0
