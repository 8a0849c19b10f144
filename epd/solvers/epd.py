"""The EPD (Ensemble Parallel Direction) step and sampler, and EPD-Plugin on iPNDM.

One coarse step ``sigma_n -> sigma_{n+1}`` with ``K`` parallel points (spec §3.2)::

    d   = (x - D(x, sigma_n)) / sigma_n                 # or x / sqrt(1 + sigma_n^2) with AFS at n = 0
    s_k = sigma_{n+1}^{r_k} * sigma_n^{1 - r_k}         # geometric, i.e. linear in log-sigma
    y_k = x + (s_k - sigma_n) * d                        # Euler probe to each point
    g_k = (y_k - D(y_k, a_k * s_k)) / s_k                # all K in ONE batched call
    x'  = x + (sigma_{n+1} - sigma_n) * sum_k w_k c_k g_k

With the plugin (``plugin="ipndm"``) the probe direction ``d`` is replaced by the Adams-Bashforth combination
of ``d`` and the previous steps' slopes.

The step's pieces (:func:`probe_direction`, :func:`epd_points`, :func:`stack_points`, :func:`epd_combine`,
:func:`epd_step`) and the table checks are the only implementation: :func:`sample_epd` runs them eagerly,
:class:`epd.graphs.GraphedEPDSampler` captures them as CUDA graphs. They take tensors and Python constants
only (no host synchronisation, no branch on tensor values), so they can be captured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..denoiser import repeat_cond
from ..errors import ConfigError
from .common import SolverOutput, check_sigmas, new_counter, sig, to_d
from .multistep import ab_combine
from .nfe import paper_nfe

__all__ = ["sample_epd", "sample_epd_ipndm", "EPDOptions", "require_table", "check_table_grid", "resolve_afs",
           "table_row", "ab_direction", "probe_direction", "epd_points", "stack_points", "unstack_points", "epd_combine", "epd_step"]

ROW_KEYS = ("positions", "weights", "scale_dir", "scale_time")


# ------------------------------------------------------------------------------------------- the table
def require_table(table) -> None:
    if table is None:
        raise ConfigError("table: the EPD solver needs a parameter table (EPDTable, snapshot path or predictor)")


def check_table_grid(table, sigmas: torch.Tensor) -> None:
    """The grid must have the ``N`` points the table was made for (``table.num_steps``, when it says)."""
    table_steps = getattr(table, "num_steps", None)
    if table_steps is not None and table_steps != len(sigmas):
        raise ConfigError(f"sigmas: grid has {len(sigmas)} points but the EPD table has num_steps={table_steps}")


def resolve_afs(table, afs: bool | None) -> bool:
    """The analytic first step: ``afs`` when given, else the table's ``afs`` metadata (off when absent)."""
    if afs is None:
        meta = getattr(table, "meta", {}) or {}
        return bool(meta.get("afs") or False)
    return bool(afs)


def table_row(table, n: int, x: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    """Row ``n`` of ``table`` as ``(B, K)`` tensors in x's dtype/device. ``table.row`` may return ``(K,)`` (one
    table for the batch) or ``(B, K)`` (one sampled table per image, as in RDPO rollouts)."""
    row = table.row(n, dtype=x.dtype, device=x.device)
    return {k: (v.expand(batch, -1) if v.dim() == 1 else v) for k, v in row.items()}


# ------------------------------------------------------------------------------------------- the step
def probe_direction(D: Callable, x: torch.Tensor, s: torch.Tensor, cond, analytic: bool) -> torch.Tensor:
    """``d = (x - D(x, s)) / s``, or the analytic first step's ``x / sqrt(1 + s^2)`` (no evaluation)."""
    if analytic:
        return x / torch.sqrt(1 + s**2)
    return to_d(x, s, D(x, s, cond))


def epd_points(x, d, s, t, row):
    """Intermediate noise levels ``s_k`` (B, K) and Euler-probed states ``y_k`` (B, K, ...)."""
    r = row["positions"]
    s_k = torch.exp(r * torch.log(t) + (1 - r) * torch.log(s))
    shape = (*s_k.shape, *([1] * (x.dim() - 1)))
    y = x.unsqueeze(1) + (s_k - s).reshape(shape) * d.unsqueeze(1)
    return s_k, y


def stack_points(y: torch.Tensor, s_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The K points ``(B, K, ...)`` and time inputs ``(B, K)`` as one point-major batch ``(K * B, ...)``."""
    B, K = s_in.shape
    return y.transpose(0, 1).reshape(K * B, *y.shape[2:]), s_in.transpose(0, 1).reshape(K * B)


def unstack_points(den: torch.Tensor, B: int, K: int) -> torch.Tensor:
    """A point-major ``(K * B, ...)`` output back as ``(B, K, ...)``."""
    return den.reshape(K, B, *den.shape[1:]).transpose(0, 1)


def epd_combine(x, s, t, y, s_k, den, row):
    """``x + (t - s) sum_k w_k c_k g_k`` with the slopes ``g_k = (y_k - D(y_k, a_k s_k)) / s_k``."""
    shape = (*s_k.shape, *([1] * (x.dim() - 1)))
    g = (y - den) / s_k.reshape(shape)
    coef = (row["weights"] * row["scale_dir"]).reshape(shape)
    return x + (t - s) * (coef * g).sum(1)


def epd_step(D: Callable, x, d, s, t, row, cond, parallel: bool = True):
    """One coarse step from ``x`` at ``s`` to ``t`` along the probe direction ``d``; returns ``(x', s_k)``.

    ``parallel``: evaluate the K points in one call (``cond`` then prepared for ``K * B`` rows, see
    :func:`~epd.denoiser.repeat_cond`) or one call each (``cond`` for ``B`` rows); the numbers are the same.
    """
    s_k, y = epd_points(x, d, s, t, row)
    s_in = row["scale_time"] * s_k
    if parallel:
        B, K = s_k.shape
        den = unstack_points(D(*stack_points(y, s_in), cond), B, K)
    else:
        den = torch.stack([D(y[:, k], s_in[:, k], cond) for k in range(s_k.shape[1])], 1)
    return epd_combine(x, s, t, y, s_k, den, row), s_k


# ------------------------------------------------------------------------------------------- the sampler
@dataclass(frozen=True)
class EPDOptions:
    """Settings of one EPD run (see :func:`sample_epd` for their meaning), resolved against the table."""

    afs: bool = False
    plugin: str | None = None
    max_order: int = 1
    parallel: bool = True
    denoise_to_zero: bool = False
    return_trajectory: bool = False
    detach_between_steps: bool = False
    context: str | list = ""

    @classmethod
    def resolve(cls, table, *, afs: bool | None, plugin: str | None, max_order: int | None, **kw) -> "EPDOptions":
        """Fill ``afs`` and the plugin's ``max_order`` from the table's metadata where not given."""
        meta = getattr(table, "meta", {}) or {}
        afs = resolve_afs(table, afs)
        if plugin not in (None, "ipndm"):
            raise ConfigError(f"plugin: expected None or 'ipndm', got {plugin!r}")
        max_order = int(max_order or meta.get("max_order") or 4) if plugin else 1
        return cls(afs=afs, plugin=plugin, max_order=max_order, **kw)


def sample_epd(denoiser, x, sigmas, *, cond=None, table=None, callback=None, afs: bool | None = None,
               plugin: str | None = None, max_order: int | None = None, parallel: bool = True,
               denoise_to_zero: bool = False, return_trajectory: bool = False, context: str = "",
               grad: bool = False, detach_between_steps: bool = False):
    """Sample with the EPD solver.

    Args:
        denoiser: a :class:`~epd.denoiser.Denoiser`.
        x (`torch.Tensor`): initial state at ``sigmas[0]`` (``sigma_max * z`` in EDM coordinates).
        sigmas (`torch.Tensor`): the ``N`` grid points, strictly decreasing and positive; ``N`` must equal the
            table's ``num_steps``.
        table (`EPDTable` or an object with ``row(n, dtype, device)``): the parameter table.
        afs (`bool`, *optional*): analytic first step; defaults to the table's ``afs`` metadata.
        plugin (`str`, *optional*): ``"ipndm"`` for EPD-Plugin (Adams-Bashforth probe direction).
        max_order (`int`, *optional*): iPNDM order for the plugin (default: table's ``max_order`` or 4).
        parallel (`bool`): evaluate the K points in one batched call (True) or one call each (identical results).
        denoise_to_zero (`bool`): finish with ``x = D(x, sigma_last)`` (one more evaluation).
        grad (`bool`): keep the autograd graph (Stage-1 distillation differentiates through the table).
        detach_between_steps (`bool`): with ``grad``, cut the graph between coarse steps.

    Returns:
        :class:`~epd.solvers.common.SolverOutput` with ``paper_nfe`` from :func:`~epd.solvers.nfe.paper_nfe`,
        ``2 (N - 1) - [afs]`` (+1 if denoise_to_zero).
    """
    with torch.set_grad_enabled(grad):
        require_table(table)
        sigmas = check_sigmas(sigmas, allow_final_zero=False)
        check_table_grid(table, sigmas)
        opts = EPDOptions.resolve(table, afs=afs, plugin=plugin, max_order=max_order, parallel=parallel,
                                  denoise_to_zero=denoise_to_zero, return_trajectory=return_trajectory,
                                  detach_between_steps=detach_between_steps, context=context)
        return _sample_epd(denoiser, x, sigmas, table=table, cond=cond, callback=callback, opts=opts)


def ab_direction(d: torch.Tensor, history: list, max_order: int) -> tuple[torch.Tensor, list]:
    """EPD-Plugin's probe direction: Adams-Bashforth over ``d`` and the previous steps' slopes."""
    history = history + [d]
    d = ab_combine(history, max_order)
    return d, (history[-(max_order - 1):] if max_order > 1 else [])


def _sample_epd(denoiser, x, sigmas, *, table, cond, callback, opts: EPDOptions) -> SolverOutput:
    """The step loop of :func:`sample_epd` (arguments already checked)."""
    B, n_steps = x.shape[0], len(sigmas) - 1
    D = new_counter(denoiser, x, cond, opts.context)
    traj = [x] if opts.return_trajectory else []
    history: list[torch.Tensor] = []
    cond_k = cond
    for n in range(n_steps):
        D.step = n
        s, t = sig(sigmas, n, x), sig(sigmas, n + 1, x)
        d = probe_direction(D, x, s, cond, analytic=opts.afs and n == 0)
        if opts.plugin:
            d, history = ab_direction(d, history, opts.max_order)
        row = table_row(table, n, x, B)
        if n == 0 and opts.parallel:
            cond_k = repeat_cond(cond, row["positions"].shape[1])
        x, s_k = epd_step(D, x, d, s, t, row, cond_k, opts.parallel)
        if traj:
            traj.append(x)
        if opts.detach_between_steps:
            x = x.detach()
        if callback is not None:
            callback({"i": n, "x": x, "sigma": s, "sigma_next": t, "points": s_k})
    nfe = paper_nfe("epd", len(sigmas), opts.afs)
    if opts.denoise_to_zero:
        D.step = n_steps
        x = D(x, sig(sigmas, n_steps, x), cond)
        nfe += 1
    return SolverOutput(x, D.calls, D.forward_passes, nfe, traj)


def sample_epd_ipndm(denoiser, x, sigmas, **kw):
    """EPD-Plugin on iPNDM (ICCV EPD-Plugin)."""
    kw.setdefault("plugin", "ipndm")
    return sample_epd(denoiser, x, sigmas, **kw)
