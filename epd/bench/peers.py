"""The learned peers' rows of ``epd bench solvers``: AMED-Solver/-Plugin, LD3 and GITS at each NFE.

Each peer learns from what EPD's row at that NFE learned from: AMED and LD3 from the same teacher set (the EPD
student grid's, written by :func:`epd.bench.study.distilled_table`; AMED with the same ``distill`` settings), GITS
from a few trajectories of the configured teacher solver on a fine grid. Results are cached in the work folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..distill import DistillConfig, metric_features
from ..peers import GITSConfig, LD3Config, base_grid, search_gits, train_amed, train_ld3
from ..predictor import load
from ..prompts import pair, resolve_prompts
from ..solvers import steps_for_nfe
from ..solvers.learned import load_grid, parse_peer, save_grid
from ..study import load_teacher, study_spec, teacher_sigmas

DEFAULT_PEERS = ("amed", "amed_plugin", "ld3_dpmpp_2m", "gits_ipndm", "gits_dpmpp_2m")


def peer_labels(sec: dict) -> list[str]:
    labels = list((sec.get("peers") or {}).get("solvers") or DEFAULT_PEERS)
    for label in labels:
        parse_peer(label)
    return labels


def _teacher(bb, sec, nfe, workdir):
    spec = study_spec(sec, nfe)
    student, _ = teacher_sigmas(bb, spec.N, 0, spec.schedule, spec.rho)
    return spec, student, load_teacher(workdir / f"teacher_nfe{nfe}", student)


def amed_table(bb, sec, nfe, solver, workdir: Path, weights_dir):
    out = workdir / f"{solver}_nfe{nfe}"
    if (out / "table.safetensors").exists():
        return load(out / "table.safetensors")
    spec, student, (man, x, s) = _teacher(bb, sec, nfe, workdir)
    dcfg = DistillConfig.from_dict(sec.get("distill"))
    meta = {"backbone": sec.get("kind", "digits"), "schedule_type": spec.schedule or bb.default_schedule,
            "sigma_min": float(student[-1]), "sigma_max": float(student[0]), "coords": bb.coords,
            "guidance_rate": sec.get("guidance"), "sampler_tea": man["solver"], "M": man["M"]}
    feats = metric_features(sec, weights_dir) if dcfg.feature_weight > 0 else None
    return train_amed(bb, solver=solver, sigmas=student, x_init=x, targets=s, prompts=man["prompts"], afs=spec.afs,
                      dcfg=dcfg, out_dir=out, scale_dir=spec.scale_dir, meta=meta, feature_fn=feats)


def learned_grid(bb, sec, nfe, method, solver, workdir: Path) -> torch.Tensor:
    st = sec.get("student") or {}
    steps = steps_for_nfe(solver, nfe) - 1
    path = workdir / (f"ld3_{solver}_nfe{nfe}" if method == "ld3" else f"gits_steps{steps}") / "grid.json"
    if path.exists():
        return load_grid(path)["sigmas"]
    if method == "ld3":
        base = base_grid(bb, solver, nfe, st.get("schedule"), st.get("rho"))
        _, _, (man, x, s) = _teacher(bb, sec, nfe, workdir)
        grid, _ = train_ld3(bb, solver=solver, base=base, x_init=x, final=s[:, -1], prompts=man["prompts"],
                            cfg=LD3Config.from_dict((sec.get("peers") or {}).get("ld3")))
    else:
        cfg = GITSConfig.from_dict((sec.get("peers") or {}).get("gits"))
        seeds = list(range(cfg.seed, cfg.seed + cfg.trajectories))
        prompts = pair(resolve_prompts((sec.get("prompts") or {}).get("train", "builtin:digits")), seeds)
        fine = bb.sigmas(cfg.fine_points, st.get("schedule")).to(torch.float64)
        grid, _ = search_gits(bb, steps=steps, fine=fine, seeds=seeds, prompts=prompts, M=cfg.M,
                              teacher_solver=(sec.get("teacher") or {}).get("solver", "heun"))
    save_grid(path, grid, method=method, solver=solver, nfe=nfe, backbone=sec.get("kind"))
    return grid


def peer_run(bb, sec, nfe, label, workdir: Path, weights_dir) -> tuple[str, torch.Tensor, object, dict]:
    """``(solver, sigmas, table, extra row fields)`` a peer row samples with (training it when not cached)."""
    method, solver = parse_peer(label)
    if method == "amed":
        table = amed_table(bb, sec, nfe, solver, workdir, weights_dir)
        spec = study_spec(sec, nfe)
        return solver, bb.sigmas(table.num_steps, spec.schedule), table, {"K": 1, "afs": spec.afs}
    return solver, learned_grid(bb, sec, nfe, method, solver, workdir), None, {"method": method}
