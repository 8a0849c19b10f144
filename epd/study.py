"""Study setup shared by the stages: the student's grid settings for a paper NFE, the nested teacher/student grids,
the grid a sampling run uses, and the reader of teacher sets (written by ``epd teacher``, read by distillation). Stages
import these from here, never from another stage's command module."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError, EPDError
from .io import read_json
from .solvers import steps_for_nfe

__all__ = ["StudySpec", "study_spec", "teacher_sigmas", "resolve_grid", "load_teacher"]


@dataclass(frozen=True)
class StudySpec:
    """What the stages of one backbone at one paper NFE share, built once from a validated config section.

    Attributes:
        nfe (`int`): the paper NFE, ``2 (N - 1) - afs``.
        N (`int`): grid points of the student (``N - 1`` steps).
        K (`int`): points per EPD step (``student.num_points``).
        afs (`bool`): analytic first step.
        schedule (`str`, *optional*): the grid's schedule (None: the backbone's default); ``rho`` its exponent.
        scale_dir (`float`), scale_time (`float`): the table's direction and time scale ranges.
        teacher_solver (`str`), M (`int`): the teacher's solver and the steps it inserts between two student points.
        teacher_seeds (`str`), teacher_batch (`int`): the teacher set's seeds and batch.
    """

    nfe: int
    N: int
    K: int
    afs: bool
    schedule: str | None
    rho: float | None
    scale_dir: float
    scale_time: float
    teacher_solver: str
    M: int
    teacher_seeds: str
    teacher_batch: int


def study_spec(section: dict, nfe: int) -> StudySpec:
    """The :class:`StudySpec` of paper-NFE ``nfe`` from a backbone section of a loaded config (schema defaults filled
    in: ``student`` and ``teacher`` blocks)."""
    st, tea = section["student"], section["teacher"]
    if st["num_points"] < 1:
        raise ConfigError(f"student.num_points: K must be >= 1, got {st['num_points']}")
    return StudySpec(nfe=nfe, N=steps_for_nfe("epd", nfe, st["afs"]), K=int(st["num_points"]), afs=bool(st["afs"]),
                     schedule=st.get("schedule"), rho=st.get("rho"), scale_dir=float(st["scale_dir"]),
                     scale_time=float(st["scale_time"]), teacher_solver=tea["solver"], M=int(tea["M"]),
                     teacher_seeds=tea["seeds"], teacher_batch=int(tea["batch"]))


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
