"""Solvers: one function per solver, one signature.

``sample_<name>(denoiser, x, sigmas, *, cond=None, table=None, callback=None, **options) -> SolverOutput``

Use :func:`get_solver` / :func:`solve` to pick one by name.
"""

from __future__ import annotations

import functools

import torch

from ..errors import ConfigError
from .common import SolverOutput, append_zero, check_final_finite, check_sigmas
from .epd import sample_epd, sample_epd_ipndm
from .multistep import sample_dpmpp_2m, sample_dpmpp_3m, sample_dpmpp_3m_diffusers, sample_ipndm, sample_ipndm_v, sample_unipc
from .single_step import sample_dpm2, sample_euler, sample_heun

__all__ = ["SOLVERS", "get_solver", "solve", "SolverOutput", "solver_paper_nfe", "steps_for_nfe"]

SOLVERS = {
    "euler": sample_euler,
    "ddim": sample_euler,
    "heun": sample_heun,
    "dpm2": sample_dpm2,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_3m": sample_dpmpp_3m,
    "dpmpp_3m_diffusers": sample_dpmpp_3m_diffusers,
    "unipc": sample_unipc,
    "ipndm": sample_ipndm,
    "ipndm3": functools.partial(sample_ipndm, max_order=3),
    "ipndm_v": sample_ipndm_v,
    "epd": sample_epd,
    "epd_ipndm": sample_epd_ipndm,
}

TABLE_SOLVERS = {"epd", "epd_ipndm"}


def get_solver(name: str):
    """Return the sampling function registered under ``name``."""
    try:
        return SOLVERS[name]
    except KeyError:
        raise ConfigError(f"solver: unknown name {name!r}; accepted: {sorted(SOLVERS)}") from None


def solve(name: str, denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, denoise_to_zero: bool = False,
          **kw) -> SolverOutput:
    """Run solver ``name``. ``denoise_to_zero`` ends with the denoised estimate (an extra Euler step to 0 for
    baselines, a final ``D(x, sigma_last)`` for EPD) instead of the last grid point."""
    fn = get_solver(name)
    if name in TABLE_SOLVERS:
        out = fn(denoiser, x, sigmas, denoise_to_zero=denoise_to_zero, **kw)
    else:
        kw.pop("table", None)
        if denoise_to_zero and float(sigmas[-1]) > 0:
            sigmas = append_zero(torch.as_tensor(sigmas))
        out = fn(denoiser, x, sigmas, **kw)
    if getattr(denoiser, "defer_finite_check", False):
        check_final_finite(out.x, kw.get("context", ""))
    return out


def solver_paper_nfe(name: str, num_points_grid: int, afs: bool = False) -> int:
    """NFE as the paper counts it for a grid of ``num_points_grid`` points ending above 0 (spec §3.3)."""
    steps = num_points_grid - 1
    if name in ("heun", "dpm2"):
        return 2 * steps
    if name in TABLE_SOLVERS:
        return 2 * steps - int(afs)
    return steps


def steps_for_nfe(name: str, nfe: int, afs: bool = True) -> int:
    """Grid points ``N`` giving paper-NFE ``nfe`` for solver ``name`` (EPD: ``nfe = 2 (N-1) - afs``)."""
    if name in ("heun", "dpm2"):
        if nfe % 2:
            raise ConfigError(f"nfe: {name} spends 2 evaluations per step; NFE {nfe} is odd")
        return nfe // 2 + 1
    if name in TABLE_SOLVERS:
        steps2 = nfe + int(afs)
        if steps2 % 2:
            raise ConfigError(f"nfe: EPD with afs={afs} reaches only {'odd' if afs else 'even'} NFE; got {nfe}")
        return steps2 // 2 + 1
    return nfe + 1


_ = check_sigmas
