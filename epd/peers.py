"""``epd peer amed|ld3|gits``: the learned-solver peers EPD is compared with, trained from the same teacher.

* AMED-Solver / AMED-Plugin (``--solver amed|amed_plugin``): a ``K = 1`` table (one intermediate time and one
  direction scale per step, see :mod:`epd.solvers.amed`) learned by Stage-1 distillation (:func:`epd.distill.distill`,
  the ``distill`` settings and teacher set of EPD at the same NFE; the intermediate time starts at the geometric
  midpoint, i.e. DPM-Solver-2). Writes ``table.safetensors``/``table.json``.
* LD3 (``--solver <base>``): a learned grid for a base solver (:mod:`epd.solvers.ld3`) from the teacher set's
  initial noise and final states, with LD3's relaxed objective. Writes ``grid.json``.
* GITS (``--solver <base>``): the grid found by dynamic programming over the coarse-to-fine cost of a few teacher
  trajectories on a fine grid (:mod:`epd.solvers.gits`). Writes ``grid.json``.

Settings: the backbone section's ``peers`` block (``ld3: {...}``, ``gits: {...}``; see :class:`LD3Config`,
:class:`GITSConfig`). ``epd sample --predictor_path table.safetensors --solver amed`` and
``epd sample --sigmas grid.json`` sample with the results.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import dataclass_from_dict
from .errors import ConfigError
from .solvers import SOLVERS, steps_for_nfe
from .solvers.gits import gits_sigmas
from .solvers.ld3 import GridParameters, ball_radius, project_to_ball
from .solvers.learned import save_grid

log = logging.getLogger(__name__)

__all__ = ["LD3Config", "GITSConfig", "train_amed", "train_ld3", "search_gits", "base_grid"]


@dataclass
class LD3Config:
    """LD3 settings (config ``peers.ld3``): Adam on the grid logits and the start offsets (in units of
    ``sigma_max``), ``radius`` of the relaxed objective's ball as a fraction of the noise norm."""

    iterations: int = 100
    batch: int = 32
    lr: float = 0.02
    radius: float = 0.01
    trajectories: int | None = None  # the first this many teacher trajectories (None: all)
    seed: int = 0
    frozen_grid: bool = False

    @classmethod
    def from_dict(cls, d: dict | None) -> "LD3Config":
        cfg = dataclass_from_dict(cls, d, "peers.ld3")
        if cfg.iterations < 0 or cfg.batch < 1 or cfg.lr <= 0 or cfg.radius < 0:
            raise ConfigError("peers.ld3: iterations must be >= 0, batch >= 1, lr > 0 and radius >= 0")
        return cfg


@dataclass
class GITSConfig:
    """GITS settings (config ``peers.gits``): the fine grid's points, the teacher's sub-steps ``M`` between fine
    points (its solver is the config's ``teacher.solver``) and the trajectories (seeds from ``seed``)."""

    fine_points: int = 101
    M: int = 2
    trajectories: int = 64
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict | None) -> "GITSConfig":
        cfg = dataclass_from_dict(cls, d, "peers.gits")
        if cfg.fine_points < 3 or cfg.M < 0 or cfg.trajectories < 1:
            raise ConfigError("peers.gits: fine_points must be >= 3, M >= 0 and trajectories >= 1")
        return cfg


def base_grid(backbone, solver: str, nfe: int, schedule=None, rho=None) -> torch.Tensor:
    """The default grid of ``solver`` at paper-NFE ``nfe`` (what the plain baseline row samples with)."""
    kw = {"rho": rho} if rho is not None else {}
    return backbone.sigmas(steps_for_nfe(solver, nfe), schedule, **kw).to(torch.float64)


# ------------------------------------------------------------------------------------------------ AMED
def train_amed(backbone, *, solver: str, sigmas, x_init, targets, prompts, afs: bool, dcfg, out_dir,
               scale_dir: float, meta: dict | None = None, feature_fn=None, run=None, seeds=None):
    """An AMED table (``K = 1``) by Stage-1 distillation; the intermediate time starts at the geometric midpoint."""
    from .distill import distill

    if solver not in ("amed", "amed_plugin"):
        raise ConfigError(f"--solver: AMED is 'amed' or 'amed_plugin', got {solver!r}")
    plugin = "ipndm" if solver == "amed_plugin" else None
    dcfg = dataclasses.replace(dcfg, init_r_base=0.5, init_r_eps=0.0)
    return distill(backbone, sigmas=sigmas, x_init=x_init, targets=targets, prompts=prompts, num_points=1,
                   afs=afs, cfg=dcfg, out_dir=out_dir, scale_dir=scale_dir, scale_time=0.0,
                   meta={**(meta or {}), "sampler_stu": solver}, feature_fn=feature_fn, run=run, seeds=seeds,
                   plugin=plugin)


# ------------------------------------------------------------------------------------------------ LD3
def _frozen(denoiser):
    for p in getattr(denoiser, "parameters", lambda: [])():
        p.requires_grad_(False)
    return denoiser


def train_ld3(backbone, *, solver: str, base: torch.Tensor, x_init: torch.Tensor, final: torch.Tensor,
              prompts: list[str], cfg: LD3Config) -> tuple[torch.Tensor, list[dict]]:
    """Learn a grid for ``solver`` starting from ``base`` (``N`` points, ends kept) so that the solver's final state
    from ``x_init + offset`` (``offset`` in the ball) matches the teacher's ``final``; returns ``(grid, history)``."""
    if solver not in SOLVERS:
        raise ConfigError(f"--solver: unknown base solver {solver!r}")
    n = len(x_init) if cfg.trajectories is None else min(cfg.trajectories, len(x_init))
    x_init, final, prompts = x_init[:n], final[:n], prompts[:n]
    grid = GridParameters(base, frozen=cfg.frozen_grid)
    sigma_max = float(base[0])
    offsets = torch.zeros_like(x_init, requires_grad=True)  # in units of sigma_max
    R = ball_radius(cfg.radius, 1.0, x_init.shape[1:])
    params = [p for p in (grid.logits, offsets) if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr) if params else None
    gen = torch.Generator().manual_seed(cfg.seed)
    den, history = _frozen(backbone.denoiser), []
    for it in range(cfg.iterations if opt else 0):
        idx = torch.randperm(n, generator=gen)[: cfg.batch]
        x = x_init[idx] + sigma_max * offsets[idx]
        out = SOLVERS[solver](den, x, grid().to(x.dtype), cond=backbone.prepare([prompts[i] for i in idx.tolist()]),
                              grad=True)
        loss = ((out.x - final[idx]) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        project_to_ball(offsets.data, R)
        history.append({"iteration": it + 1, "loss": loss.item()})
    with torch.no_grad():
        return grid().detach(), history


# ------------------------------------------------------------------------------------------------ GITS
@torch.no_grad()
def teacher_states(backbone, *, seeds: list[int], prompts: list[str], fine: torch.Tensor, M: int,
                   solver: str) -> torch.Tensor:
    """Teacher states ``(B, G, ...)`` at the ``G`` fine points (``solver`` with ``M`` sub-steps between them)."""
    from .solvers import solve

    G = len(fine)
    log_f = torch.log(fine)
    sub = torch.linspace(0, 1, M + 2, dtype=torch.float64)[:-1]
    inner = [torch.exp(log_f[i] + (log_f[i + 1] - log_f[i]) * sub) for i in range(G - 1)]
    teacher = torch.cat(inner + [fine[-1:]])
    x = backbone.noise(seeds, sigma=float(fine[0]))
    out = solve(solver, backbone.denoiser, x, teacher.to(x.dtype), cond=backbone.prepare(prompts),
                return_trajectory=True)
    return torch.stack(out.trajectory, 1)[:, :: M + 1]


def search_gits(backbone, *, steps: int, fine: torch.Tensor, seeds: list[int], prompts: list[str], M: int,
                teacher_solver: str) -> tuple[torch.Tensor, list[int]]:
    """GITS' grid of ``steps`` steps on the fine grid ``fine``; returns ``(sigmas, fine indices)``."""
    states = teacher_states(backbone, seeds=seeds, prompts=prompts, fine=fine, M=M, solver=teacher_solver)
    return gits_sigmas(backbone.denoiser, states, fine, steps, cond=backbone.prepare(prompts))


# ----------------------------------------------------------------------------------------------- CLI
def add_arguments(p):
    p.add_argument("--config", required=True)
    p.add_argument("--backbone", required=True, help="name of a backbone in the config")
    p.add_argument("--nfe", type=int, required=True, help="paper-NFE of the peer")
    p.add_argument("--solver", required=True,
                   help="amed / amed_plugin (epd peer amed), or the base solver of a learned grid (ld3, gits)")
    p.add_argument("--teacher", default=None, help="teacher folder of `epd teacher` at this NFE (amed, ld3)")
    p.add_argument("--out", required=True, help="output folder (table.* for AMED, grid.json for LD3/GITS)")
    p.add_argument("--weights", default=None, help="trained backbone folder (embedded backbone)")
    p.add_argument("--device", default="cpu")


def run(args):
    from . import tracking
    from .backbones import load_backbone
    from .config import backbone_section, load_config

    method = args._words[-1]
    sec = backbone_section(load_config(args.config), args.backbone)
    if method in ("amed", "ld3") and not args.teacher:
        raise ConfigError(f"--teacher: `epd peer {method}` needs the teacher folder of `epd teacher` at --nfe")
    bb = load_backbone(sec, device=args.device, weights_dir=args.weights)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    params = {"method": method, "solver": args.solver, "nfe": args.nfe}
    with tracking.start_run(f"peer_{method}", backbone=args.backbone, params=params, tags={"nfe": args.nfe}):
        t0 = time.time()
        msg = {"amed": _run_amed, "ld3": _run_ld3, "gits": _run_gits}[method](args, sec, bb)
    print(f"{msg} ({time.time() - t0:.1f} s) -> {args.out}")
    return 0


def _run_amed(args, sec, bb) -> str:
    from .distill import DistillConfig, metric_features
    from .study import load_teacher, study_spec, teacher_sigmas

    spec = study_spec(sec, args.nfe)
    dcfg = DistillConfig.from_dict(sec.get("distill"))
    student, _ = teacher_sigmas(bb, spec.N, 0, spec.schedule, spec.rho)
    man, x, s = load_teacher(args.teacher, expect_sigmas=student)
    meta = {"backbone": sec.get("kind", args.backbone), "schedule_type": spec.schedule or bb.default_schedule,
            "schedule_rho": spec.rho, "sigma_min": float(student[-1]), "sigma_max": float(student[0]),
            "coords": bb.coords, "guidance_rate": sec.get("guidance"), "sampler_tea": man["solver"], "M": man["M"],
            "dataset_name": args.backbone}
    feats = metric_features(sec, args.weights, args.device) if dcfg.feature_weight > 0 else None
    table = train_amed(bb, solver=args.solver, sigmas=student, x_init=x, targets=s, prompts=man["prompts"],
                       afs=spec.afs, dcfg=dcfg, out_dir=args.out, scale_dir=spec.scale_dir, meta=meta,
                       feature_fn=feats, seeds=man.get("seeds"))
    return table.summary()


def _run_ld3(args, sec, bb) -> str:
    from .study import load_teacher

    st = sec.get("student") or {}
    base = base_grid(bb, args.solver, args.nfe, st.get("schedule"), st.get("rho"))
    man, x, s = load_teacher(args.teacher)
    have = torch.tensor(man["student_sigmas"], dtype=torch.float64)[[0, -1]]
    if not torch.allclose(have, base[[0, -1]], rtol=1e-7):
        raise ConfigError(f"--teacher {args.teacher}: its grid runs {have.tolist()}, the base grid "
                          f"{base[[0, -1]].tolist()}; use a teacher set of this backbone's schedule")
    cfg = LD3Config.from_dict((sec.get("peers") or {}).get("ld3"))
    grid, hist = train_ld3(bb, solver=args.solver, base=base, x_init=x, final=s[:, -1], prompts=man["prompts"],
                           cfg=cfg)
    save_grid(Path(args.out) / "grid.json", grid, method="ld3", solver=args.solver, nfe=args.nfe,
              backbone=sec.get("kind"), provenance={"config": asdict(cfg), "base": base.tolist(),
                                                    "teacher": man["config_hash"], "history": hist})
    return f"LD3 grid for {args.solver} at NFE {args.nfe}: {[round(v, 4) for v in grid.tolist()]}"


def _run_gits(args, sec, bb) -> str:
    from .prompts import pair, resolve_prompts

    st, tea = sec.get("student") or {}, sec.get("teacher") or {}
    cfg = GITSConfig.from_dict((sec.get("peers") or {}).get("gits"))
    seeds = list(range(cfg.seed, cfg.seed + cfg.trajectories))
    prompts = pair(resolve_prompts((sec.get("prompts") or {}).get("train", "builtin:digits")), seeds)
    kw = {"rho": st["rho"]} if st.get("rho") is not None else {}
    fine = bb.sigmas(cfg.fine_points, st.get("schedule"), **kw).to(torch.float64)
    grid, path = search_gits(bb, steps=steps_for_nfe(args.solver, args.nfe) - 1, fine=fine, seeds=seeds,
                             prompts=prompts, M=cfg.M, teacher_solver=tea.get("solver", "heun"))
    save_grid(Path(args.out) / "grid.json", grid, method="gits", solver=args.solver, nfe=args.nfe,
              backbone=sec.get("kind"), provenance={"config": asdict(cfg), "fine_indices": path,
                                                    "teacher_solver": tea.get("solver", "heun")})
    return f"GITS grid for {args.solver} at NFE {args.nfe}: {[round(v, 4) for v in grid.tolist()]}"
