"""Shared steps of the embedded-backbone benchmarks: a trained backbone, distilled tables, evaluation sets.

Everything runs in-process in a work folder; a given ``--weights`` folder (output of ``epd backbone train``)
skips training. Evaluation uses held-out seeds that no training stage saw, paired across solvers.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

from ..config import backbone_section, load_config
from ..distill import DistillConfig, distill, metric_features
from ..prompts import pair, resolve_prompts
from ..study import load_teacher, study_spec, teacher_sigmas
from ..teacher import generate


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "platform": platform.platform(), "python": platform.python_version(), "gpu": None}


def load_study(config_path: str, backbone: str = "digits") -> tuple[dict, dict]:
    cfg = load_config(config_path)
    return cfg, backbone_section(cfg, backbone)


def ensure_backbone(config_path: str, sec: dict, workdir: Path, weights: str | None) -> tuple[object, Path, float]:
    """Load ``weights`` or train the digits backbone into ``workdir/backbone``; returns (backbone, dir, minutes)."""
    from ..backbones import load_backbone

    minutes = 0.0
    if weights is None:
        from ..backbones.digits.train import load_train_config, train

        wdir = workdir / "backbone"
        t0 = time.time()
        train(load_train_config(config_path, sec.get("name", "digits")), wdir, progress=True)
        minutes = (time.time() - t0) / 60
    else:
        wdir = Path(weights)
    return load_backbone(sec, weights_dir=str(wdir)), wdir, minutes


def distilled_table(bb, sec: dict, nfe: int, workdir: Path, weights_dir=None):
    """Teacher trajectories + Stage-1 distillation for one NFE (cached in ``workdir``)."""
    from ..io import parse_seeds
    from ..predictor import load

    spec = study_spec(sec, nfe)
    out = workdir / f"distill_nfe{nfe}"
    if (out / "table.safetensors").exists():
        return load(out / "table.safetensors"), spec
    prompts = resolve_prompts((sec.get("prompts") or {}).get("train", "builtin:digits"))
    generate(bb, prompts=prompts, seeds=parse_seeds(spec.teacher_seeds), num_points=spec.N, M=spec.M,
             solver=spec.teacher_solver, out_dir=workdir / f"teacher_nfe{nfe}", batch=spec.teacher_batch,
             schedule=spec.schedule, rho=spec.rho)
    student, _ = teacher_sigmas(bb, spec.N, 0, spec.schedule, spec.rho)
    man, x, s = load_teacher(workdir / f"teacher_nfe{nfe}", student)
    meta = {"backbone": sec.get("kind", "digits"), "schedule_type": spec.schedule or bb.default_schedule,
            "sigma_min": float(student[-1]), "sigma_max": float(student[0]), "coords": bb.coords,
            "guidance_rate": sec.get("guidance"), "sampler_tea": man["solver"], "M": man["M"]}
    dcfg = DistillConfig.from_dict(sec.get("distill"))
    table = distill(bb, sigmas=student, x_init=x, targets=s, prompts=man["prompts"], num_points=spec.K,
                    afs=spec.afs, cfg=dcfg, out_dir=out, scale_dir=spec.scale_dir, scale_time=spec.scale_time, meta=meta,
                    feature_fn=metric_features(sec, weights_dir) if dcfg.feature_weight > 0 else None)
    return table, spec


def eval_set(sec: dict, n: int, offset: int = 900000) -> tuple[list[int], list[str]]:
    """Held-out evaluation seeds (disjoint from teacher/RDPO seeds) with their prompts."""
    prompts = resolve_prompts((sec.get("prompts") or {}).get("eval", "builtin:digits"))
    seeds = list(range(offset, offset + n))
    return seeds, pair(prompts, seeds)


@torch.no_grad()
def run_solver(bb, solver: str, seeds, prompts, sigmas, table=None, batch: int = 500, **kw):
    """Final states, images and the last SolverOutput for a set of seeds."""
    from ..solvers import solve

    xs, outs = [], None
    for i in range(0, len(seeds), batch):
        x = bb.noise(seeds[i:i + batch], sigma=float(sigmas[0]))
        extra = {"table": table} if table is not None else {}
        outs = solve(solver, bb.denoiser, x, sigmas.to(x.dtype), cond=bb.prepare(prompts[i:i + batch]), **extra, **kw)
        xs.append(outs.x)
    x = torch.cat(xs)
    return x, bb.decode(x), outs
