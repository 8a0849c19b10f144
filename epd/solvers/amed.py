"""AMED-Solver and AMED-Plugin (Zhou et al., CVPR 2024): one learned intermediate time and scale per step.

One coarse step ``sigma_n -> sigma_{n+1}`` (``s -> t``)::

    d     = (x - D(x, s)) / s                    # AFS at n = 0: x / sqrt(1 + s^2), no evaluation
    s_mid = t^r * s^(1 - r)                      # the learned intermediate time, geometric in sigma
    y     = x + (s_mid - s) * d                  # Euler probe to it
    g     = (y - D(y, s_mid)) / s_mid
    x'    = x + c * (t - s) * g                  # the learned scale c

AMED-Plugin replaces the probe direction ``d`` by iPNDM's Adams-Bashforth combination of ``d`` and the previous
steps' slopes. The original predicts ``(r, c)`` with a small network on the denoiser's bottleneck features; the
denoisers here do not expose those features, so ``(r, c)`` are one learned row per step: an EPD table with one
point (``K = 1``: position ``r``, weight 1, ``scale_dir`` ``c``). That is EPD with ``K = 1``, so the step runs
through :func:`epd.solvers.epd.epd_step`; with ``r = 1/2``, ``c = 1`` and no AFS, AMED-Solver is DPM-Solver-2.
Both spend two sequential evaluations per step (one saved by AFS) and one forward pass per evaluation.
"""

from __future__ import annotations

from ..errors import ConfigError
from .epd import require_table, sample_epd

__all__ = ["sample_amed", "sample_amed_plugin", "AMED_POINTS"]

AMED_POINTS = 1  # points per step of an AMED table


def _check_amed_table(table) -> None:
    require_table(table)
    K = getattr(table, "num_points", None)
    if K is None and hasattr(table, "row"):
        K = table.row(0)["positions"].shape[-1]
    if K != AMED_POINTS:
        raise ConfigError(f"table: AMED takes one intermediate point per step (num_points=1), this table has "
                          f"num_points={K}; use the epd solver for K > 1 or distil an AMED table (`epd peer amed`)")


def sample_amed(denoiser, x, sigmas, *, table=None, **kw):
    """AMED-Solver: a learned intermediate time ``r`` and direction scale ``c`` per step (a ``K = 1`` table)."""
    _check_amed_table(table)
    return sample_epd(denoiser, x, sigmas, table=table, **kw)


def sample_amed_plugin(denoiser, x, sigmas, *, table=None, **kw):
    """AMED-Plugin on iPNDM: AMED's step with the Adams-Bashforth probe direction (``max_order`` from the table)."""
    _check_amed_table(table)
    kw.setdefault("plugin", "ipndm")
    return sample_epd(denoiser, x, sigmas, table=table, **kw)
