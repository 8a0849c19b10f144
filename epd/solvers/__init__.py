"""Solvers: one function per solver, one signature.

``sample_<name>(denoiser, x, sigmas, *, cond=None, table=None, callback=None, **options) -> SolverOutput``

Use :func:`get_solver` / :func:`solve` to pick one by name. Every solver keeps one contract
(tests/test_solver_contract.py): ``paper_nfe`` is :func:`paper_nfe` of the grid, ``callback(info)`` runs once per
step with ``info`` keys ``i``, ``x``, ``sigma``, ``sigma_next`` and ``denoised`` (baselines) or ``points`` (table
solvers: the K intermediate noise levels, ``(B, K)``), ``return_trajectory`` gives the ``N`` states, the input
dtype is kept, and only :data:`TABLE_SOLVERS` take a table (they raise ConfigError without one; baselines ignore it).
"""

from __future__ import annotations

import functools

import torch

from ..errors import ConfigError
from .amed import sample_amed, sample_amed_plugin
from .common import SolverOutput, append_zero, check_final_finite
from .epd import sample_epd, sample_epd_ipndm
from .multistep import sample_dpmpp_2m, sample_dpmpp_3m, sample_dpmpp_3m_diffusers, sample_ipndm, sample_ipndm_v, sample_unipc
from .nfe import TABLE_POINTS, TABLE_SOLVERS, paper_nfe, steps_for_nfe
from .single_step import sample_dpm2, sample_euler, sample_heun

__all__ = ["SOLVERS", "TABLE_SOLVERS", "TABLE_POINTS", "get_solver", "solve", "SolverOutput", "paper_nfe", "steps_for_nfe"]

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
    "amed": sample_amed,
    "amed_plugin": sample_amed_plugin,
}


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
