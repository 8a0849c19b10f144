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
from .errors import ConfigError, EPDError
from .io import atomic_path, atomic_write_json, config_hash, parse_seeds, read_json
from .prompts import pair, resolve_prompts
from .solvers import solve, steps_for_nfe

log = logging.getLogger(__name__)

__all__ = ["student_setup", "teacher_sigmas", "generate", "load_teacher"]


def student_setup(section: dict, nfe: int) -> dict:
    """The student's grid settings for paper-NFE ``nfe`` from a backbone config section's ``student`` block."""
    st = dict(section.get("student") or {})
    afs = bool(st.get("afs", True))
    K = int(st.get("num_points", 2))
    if K < 1:
        raise ConfigError(f"student.num_points: K must be >= 1, got {K}")
    return {"num_points_grid": steps_for_nfe("epd", nfe, afs), "K": K, "afs": afs,
            "schedule": st.get("schedule"), "rho": st.get("rho"),
            "scale_dir": float(st.get("scale_dir", 0.0)), "scale_time": float(st.get("scale_time", 0.0))}


def _sigmas(backbone, n, schedule, rho):
    kw = {"rho": rho} if rho is not None else {}
    return backbone.sigmas(n, schedule, **kw).to(torch.float64)


def teacher_sigmas(backbone, num_points: int, M: int, schedule=None, rho=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(student_sigmas, teacher_sigmas)``; raises if the student grid is not contained in the teacher grid."""
    if M < 0:
        raise ConfigError(f"teacher.M: must be >= 0, got {M}")
    student = _sigmas(backbone, num_points, schedule, rho)
    teacher = _sigmas(backbone, (M + 1) * (num_points - 1) + 1, schedule, rho)
    if not torch.allclose(teacher[:: M + 1], student, rtol=1e-9, atol=1e-12):
        raise ConfigError("teacher grid does not contain the student grid; this schedule is not nested "
                          f"(schedule={schedule!r}); use one that is uniform in its own variable")
    return student, teacher


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


def load_teacher(path: str | Path, expect_sigmas: torch.Tensor | None = None) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Load ``(manifest, x_init, states)``; with ``expect_sigmas`` checks the set was made for that grid."""
    from safetensors.torch import load_file

    path = Path(path)
    manifest = read_json(path / "manifest.json")
    if manifest.get("format") != "epd-teacher":
        raise EPDError(f"{path}: not a teacher set (manifest format {manifest.get('format')!r})")
    if expect_sigmas is not None:
        have = torch.tensor(manifest["student_sigmas"], dtype=torch.float64)
        if have.shape != expect_sigmas.shape or not torch.allclose(have, expect_sigmas.double(), rtol=1e-7):
            raise ConfigError(f"teacher set {path} was made for another grid: it has {len(have)} points "
                              f"{[round(v, 5) for v in have.tolist()]}, the student needs {len(expect_sigmas)} "
                              f"{[round(v, 5) for v in expect_sigmas.tolist()]}")
    from safetensors import SafetensorError

    xs, ss = [], []
    for name in manifest["shards"]:
        f = path / name
        if not f.exists():
            raise EPDError(f"teacher set {path}: shard {name} is missing (rerun `epd teacher` to complete it)")
        try:
            t = load_file(str(f))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise EPDError(f"teacher shard {f}: unreadable, truncated or corrupt ({e}); delete it and rerun "
                           "`epd teacher` with the same settings to regenerate it") from None
        if {"x_init", "states"} - t.keys() or t["states"].shape[:1] != t["x_init"].shape[:1]:
            raise EPDError(f"teacher shard {f}: expected tensors x_init (B, ...) and states (B, N-1, ...), got "
                           f"{ {k: tuple(v.shape) for k, v in t.items()} }; delete it and rerun `epd teacher`")
        for k in ("x_init", "states"):
            if not torch.isfinite(t[k]).all():
                row = int((~torch.isfinite(t[k].flatten(1))).any(1).nonzero()[0])
                i = sum(len(v) for v in xs) + row
                seed = manifest["seeds"][i] if i < len(manifest.get("seeds", [])) else "?"
                raise EPDError(f"teacher shard {f}: {k} holds NaN/inf for trajectory {i} (seed {seed}); "
                               "regenerate the shard (delete it and rerun `epd teacher`)")
        xs.append(t["x_init"])
        ss.append(t["states"])
    return manifest, torch.cat(xs), torch.cat(ss)


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
    tea = dict(sec.get("teacher") or {})
    st = student_setup(sec, args.nfe)
    seeds = parse_seeds(args.seeds or tea.get("seeds", "0-255"))
    prompts = resolve_prompts(tea.get("prompts") or sec.get("prompts", {}).get("train", "builtin:digits"))
    bb = load_backbone(sec, device=args.device, weights_dir=args.weights)
    params = {"nfe": args.nfe, "solver": tea.get("solver", "heun"), "M": int(tea.get("M", 19)),
              "num_points": st["num_points_grid"], "seeds": f"{seeds[0]}-{seeds[-1]} ({len(seeds)})"}
    with tracking.start_run("teacher", backbone=args.backbone, params=params, tags={"nfe": args.nfe}) as r:
        m = generate(bb, prompts=prompts, seeds=seeds, num_points=st["num_points_grid"], M=params["M"],
                     solver=params["solver"], out_dir=args.out, batch=int(tea.get("batch", 256)),
                     schedule=st["schedule"], rho=st["rho"])
        r.metrics({"teacher_nfe": m["teacher_nfe"], "seconds": m["seconds"]})
    print(f"teacher set: {len(seeds)} trajectories, {m['teacher_nfe']} NFE each -> {args.out}")
    return 0
