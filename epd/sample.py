"""``epd sample``: sample images with any solver or EPD snapshot.

Flags follow the original ``sample.py`` where they overlap (``--predictor_path``, ``--seeds 0-63``, ``--batch``,
``--prompt``, ``--prompt-file``, ``--outdir``, ``--grid``, ``--subdirs``). Each image ``NNNNNN.png`` (the seed)
gets a sidecar ``NNNNNN.json`` with solver, NFE, forward passes, seed and prompt, which ``epd evaluate`` uses to
pair images with prompts. Images already present with a matching sidecar are skipped, so an interrupted run
resumes; every file is written under a temporary name first.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .errors import ConfigError, EPDError
from .io import atomic_path, atomic_write_json, config_hash, parse_seeds, read_json
from .predictor import check_compatible, load as load_table
from .prompts import pair, resolve_prompts
from .solvers import TABLE_SOLVERS, solve, steps_for_nfe

log = logging.getLogger(__name__)

__all__ = ["sample_batch", "sample_to_dir", "save_png"]


def save_png(img: torch.Tensor, path: Path) -> None:
    """Save a ``(3, H, W)`` image in ``[0, 1]`` as 8-bit RGB PNG, atomically."""
    from PIL import Image

    arr = (img.clamp(0, 1).permute(1, 2, 0).cpu().float().numpy() * 255 + 0.5).astype(np.uint8)
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def resolve_grid(backbone, solver: str, *, nfe: int | None = None, steps: int | None = None, table=None,
                 schedule: str | None = None, afs: bool = True, rho=None) -> torch.Tensor:
    """Noise levels for a run: from the table's metadata (EPD), or from NFE/steps for baselines."""
    kw = {"rho": rho} if rho is not None else {}
    if table is not None:
        sched = table.meta.get("schedule_type") or schedule
        if sched in ("polynomial",):
            sched = "edm"
        if table.meta.get("schedule_rho") is not None and sched in ("edm", "polynomial", "time_uniform", "discrete"):
            kw["rho"] = table.meta["schedule_rho"]
        return backbone.sigmas(table.num_steps, sched, **kw)
    if (nfe is None) == (steps is None):
        raise ConfigError("give exactly one of --nfe or --steps for a baseline solver")
    n_points = steps_for_nfe(solver, nfe, afs) if nfe is not None else steps + 1
    return backbone.sigmas(n_points, schedule, **kw)


@torch.no_grad()
def sample_batch(backbone, solver: str, seeds: list[int], prompts: list[str], sigmas: torch.Tensor, table=None,
                 **solver_kw):
    """Sample one batch; returns ``(final states, images, SolverOutput)``."""
    x = backbone.noise(seeds)
    cond = backbone.prepare(prompts)
    kw = dict(solver_kw)
    if solver in TABLE_SOLVERS:
        kw["table"] = table
    kw.setdefault("context", [f"seed {s}, prompt {p!r}" for s, p in zip(seeds, prompts)])
    out = solve(solver, backbone.denoiser, x, sigmas.to(x.dtype), cond=cond, **kw)
    return out.x, backbone.decode(out.x), out


def sample_to_dir(backbone, *, solver: str, seeds: list[int], prompts: list[str], outdir: str | Path,
                  sigmas: torch.Tensor, table=None, batch: int = 64, subdirs: bool = False, grid: bool = False,
                  save_latents: bool = False, label: str | None = None, extra: dict | None = None) -> dict:
    """Sample every seed into ``outdir`` (resuming), write sidecars and a ``summary.json``; returns the summary."""
    if batch < 1:
        raise ConfigError(f"--batch: must be >= 1, got {batch}")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paired = pair(prompts, seeds)
    label = label or solver
    info = {"solver": label, "base_solver": solver, "num_points": len(sigmas), "sigmas": sigmas.tolist(),
            "grid_hash": config_hash([round(float(v), 12) for v in sigmas.tolist()]), "backbone": backbone.name,
            **({"table_hash": _table_hash(table)} if table is not None else {}), **(extra or {})}
    latents = {}
    t0 = time.time()
    nfe = fwd = paper = None
    todo = []
    for s, p in zip(seeds, paired):
        png = _png_path(outdir, s, subdirs)
        side = png.with_suffix(".json")
        if png.exists() and side.exists() and not save_latents:
            meta = read_json(side)
            _check_same_run(side, meta, {**info, "seed": s, "prompt": p})
            nfe, fwd, paper = meta["nfe_sequential"], meta["forward_passes"], meta["nfe"]
            continue
        todo.append((s, p))
    for start in tqdm(range(0, len(todo), batch), desc=f"sample {label}", unit="batch", disable=not todo):
        chunk = todo[start:start + batch]
        s_list, p_list = [c[0] for c in chunk], [c[1] for c in chunk]
        x, imgs, out = sample_batch(backbone, solver, s_list, p_list, sigmas, table)
        if imgs.dim() != 4 or imgs.shape[1] != 3:
            raise EPDError(f"backbone {backbone.name}: decodes to shape {tuple(imgs.shape)}, not RGB images "
                           "(B, 3, H, W); `epd sample` writes images, use `epd teacher` or the library for this one")
        nfe, fwd, paper = out.nfe, out.forward_passes, out.paper_nfe
        for i, (s, p) in enumerate(chunk):
            png = _png_path(outdir, s, subdirs)
            save_png(imgs[i], png)
            atomic_write_json(png.with_suffix(".json"), {
                "seed": s, "prompt": p, "solver": label, "nfe": paper, "nfe_sequential": nfe,
                "forward_passes": fwd, "image": png.name, **{k: v for k, v in info.items() if k != "sigmas"}})
            if save_latents:
                latents[s] = x[i].float().cpu()
    if save_latents and latents:
        from safetensors.torch import save_file

        with atomic_path(outdir / "latents.safetensors", suffix=".safetensors") as tmp:
            order = sorted(latents)
            save_file({"seeds": torch.tensor(order), "latents": torch.stack([latents[s] for s in order])}, str(tmp))
    if grid:
        _write_grid(outdir, seeds[:64], subdirs)
    summary = {**info, "seeds": f"{seeds[0]}-{seeds[-1]}", "count": len(seeds), "nfe": paper,
               "nfe_sequential": nfe, "forward_passes": fwd, "seconds": round(time.time() - t0, 2)}
    atomic_write_json(outdir / "summary.json", summary)
    return summary


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
    p.add_argument("--seeds", default="0-63", help="seed range, e.g. 0-63 or 1,5,9-11")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt", default=None, help="one prompt for every seed")
    p.add_argument("--prompt-file", "--prompt_file", dest="prompt_file", default=None, help="txt or csv (text)")
    p.add_argument("--outdir", required=True)
    p.add_argument("--label", default=None, help="solver label stored in sidecars (default: solver name)")
    p.add_argument("--grid", action="store_true", help="also write grid.png of the first 64 images")
    p.add_argument("--subdirs", action="store_true", help="group images in folders of 1000 seeds")
    p.add_argument("--save-latents", action="store_true", help="also write latents.safetensors (final states)")
    p.add_argument("--weights", default=None, help="trained backbone folder (embedded backbone)")
    p.add_argument("--device", default="cpu")


def run(args):
    from . import tracking
    from .backbones import load_backbone
    from .config import backbone_section, load_config

    cfg = load_config(args.config)
    sec = backbone_section(cfg, args.backbone)
    solver = args.solver or ("epd" if args.predictor_path else None)
    if solver is None:
        raise ConfigError("--solver: required unless --predictor_path is given")
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
    bb = load_backbone(sec, device=args.device, weights_dir=args.weights)
    st = sec.get("student") or {}
    sigmas = resolve_grid(bb, solver, nfe=args.nfe, steps=args.steps, table=table,
                          schedule=args.schedule or st.get("schedule"), afs=bool(st.get("afs", True)))
    label = args.label or solver
    tags = {"solver": label, "nfe": args.nfe if args.nfe is not None else "", "predictor": args.predictor_path or ""}
    with tracking.start_run("sample", backbone=args.backbone, tags=tags,
                            params={"seeds": args.seeds, "num_points": len(sigmas), "batch": args.batch}) as r:
        summary = sample_to_dir(bb, solver=solver, seeds=seeds, prompts=prompts, outdir=args.outdir, sigmas=sigmas,
                                table=table, batch=args.batch, subdirs=args.subdirs, grid=args.grid,
                                save_latents=args.save_latents, label=label,
                                extra={"predictor_path": args.predictor_path})
        r.metrics({"nfe": summary["nfe"], "forward_passes": summary["forward_passes"], "seconds": summary["seconds"]})
    print(f"{summary['count']} images ({label}, NFE {summary['nfe']}, {summary['forward_passes']} forward passes) "
          f"-> {args.outdir}")
    return 0

