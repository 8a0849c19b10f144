"""``epd teacher``: teacher trajectories on a student's grid (spec §4.2).

The teacher runs ``solver`` on the same schedule with ``M`` extra points inside every student interval,
``N_T = (M + 1)(N - 1) + 1``, so the student grid is the teacher grid's every ``(M + 1)``-th point. Stored:
``shard-XXXXX.safetensors`` with ``x_init (B, ...)`` and ``states (B, N - 1, ...)`` (teacher states at student
points 1..N-1), and ``manifest.json`` (grid, seeds, prompts, solver, M, config hash, shard list). Shards are
written atomically and skipped on rerun, so an interrupted job resumes where it stopped.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .config import backbone_section, load_config
from .errors import EPDError
from .io import atomic_path, atomic_write_json, config_hash, parse_seeds, read_json
from .memory import out_of_memory_names
from .prompts import pair, resolve_prompts
from .solvers import solve
from .study import study_spec, teacher_sigmas

log = logging.getLogger(__name__)

__all__ = ["generate"]


def generate(backbone, *, prompts: list[str], seeds: list[int], num_points: int, M: int, solver: str,
             out_dir: str | Path, batch: int = 256, schedule=None, rho=None, extra_meta: dict | None = None) -> dict:
    """Generate (or resume) a teacher set; returns the manifest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    student, teacher = teacher_sigmas(backbone, num_points, M, schedule, rho)
    paired = pair(prompts, seeds)
    identity = {"backbone": backbone.name, "student_sigmas": student.tolist(), "M": M, "solver": solver,
                "seeds": seeds, "prompts": paired, **(extra_meta or {})}
    manifest = {"format": "epd-teacher", "config_hash": config_hash(identity), "backbone": backbone.name,
                "solver": solver, "M": M, "num_points": num_points, "teacher_num_points": len(teacher),
                "student_sigmas": student.tolist(), "teacher_sigmas": teacher.tolist(), "seeds": seeds,
                "prompts": paired, "batch": batch, "shards": [], **(extra_meta or {})}
    mpath = out_dir / "manifest.json"
    if mpath.exists():
        old = read_json(mpath)
        if old.get("config_hash") != manifest["config_hash"]:
            raise EPDError(f"{mpath}: an existing teacher set with different settings is here; "
                           "remove the folder or choose another --out")
    nfe = fwd = 0
    t0 = time.time()
    for start in tqdm(range(0, len(seeds), batch), desc=f"teacher {backbone.name} N={num_points}", unit="batch"):
        shard = out_dir / f"shard-{start // batch:05d}.safetensors"
        manifest["shards"].append(shard.name)
        if shard.exists():
            continue
        s, p = seeds[start:start + batch], paired[start:start + batch]
        x = backbone.noise(s, sigma=float(teacher[0]))
        cond = backbone.prepare(p)
        with out_of_memory_names("teacher.batch", batch, "the teacher solve"):
            out = solve(solver, backbone.denoiser, x, teacher.to(x.dtype), cond=cond, return_trajectory=True,
                        context=[f"teacher seed {a}, prompt {b!r}" for a, b in zip(s, p)])
        traj = torch.stack(out.trajectory, 1)[:, :: M + 1][:, 1:]  # student points 1..N-1
        nfe, fwd = out.nfe, out.forward_passes
        from safetensors.torch import save_file

        with atomic_path(shard, suffix=".safetensors") as tmp:
            save_file({"x_init": x.contiguous(), "states": traj.contiguous()}, str(tmp))
        atomic_write_json(mpath, manifest)  # progress so far
    manifest["teacher_nfe"], manifest["teacher_forward_passes"] = nfe, fwd
    manifest["seconds"] = round(time.time() - t0, 2)
    atomic_write_json(mpath, manifest)
    return manifest


# ----------------------------------------------------------------------------------------------- CLI
def add_arguments(p):
    p.add_argument("--config", required=True)
    p.add_argument("--backbone", required=True, help="name of a backbone in the config")
    p.add_argument("--nfe", type=int, required=True, help="student paper-NFE whose grid the teacher follows")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--weights", default=None, help="trained backbone folder (embedded backbone)")
    p.add_argument("--seeds", default=None, help="override teacher.seeds, e.g. 0-1023")
    p.add_argument("--device", default="cpu")


def run(args):
    from . import tracking
    from .backbones import load_backbone

    cfg = load_config(args.config)
    sec = backbone_section(cfg, args.backbone)
    spec = study_spec(sec, args.nfe)
    seeds = parse_seeds(args.seeds or spec.teacher_seeds)
    prompts = resolve_prompts(sec["teacher"].get("prompts") or sec.get("prompts", {}).get("train", "builtin:digits"))
    bb = load_backbone(sec, device=args.device, weights_dir=args.weights)
    params = {"nfe": args.nfe, "solver": spec.teacher_solver, "M": spec.M,
              "grid_points": spec.N, "seeds": f"{seeds[0]}-{seeds[-1]} ({len(seeds)})"}
    with tracking.start_run("teacher", backbone=args.backbone, params=params, tags={"nfe": args.nfe}) as r:
        m = generate(bb, prompts=prompts, seeds=seeds, num_points=spec.N, M=params["M"],
                     solver=params["solver"], out_dir=args.out, batch=spec.teacher_batch,
                     schedule=spec.schedule, rho=spec.rho)
        r.metrics({"teacher_nfe": m["teacher_nfe"], "seconds": m["seconds"]})
    print(f"teacher set: {len(seeds)} trajectories, {m['teacher_nfe']} NFE each -> {args.out}")
    return 0
