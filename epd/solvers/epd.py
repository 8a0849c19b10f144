"""The EPD (Ensemble Parallel Direction) step and sampler, and EPD-Plugin on iPNDM.

One coarse step ``sigma_n -> sigma_{n+1}`` with ``K`` parallel points (spec §3.2)::

    d   = (x - D(x, sigma_n)) / sigma_n                 # or x / sqrt(1 + sigma_n^2) with AFS at n = 0
    s_k = sigma_{n+1}^{r_k} * sigma_n^{1 - r_k}         # geometric, i.e. linear in log-sigma
    y_k = x + (s_k - sigma_n) * d                        # Euler probe to each point
    g_k = (y_k - D(y_k, a_k * s_k)) / s_k                # all K in ONE batched call
    x'  = x + (sigma_{n+1} - sigma_n) * sum_k w_k c_k g_k

With the plugin (``plugin="ipndm"``) the probe direction ``d`` is replaced by the Adams-Bashforth combination
of ``d`` and the previous steps' slopes.
"""

from __future__ import annotations

import torch

from ..denoiser import repeat_cond
from ..errors import ConfigError
from .common import SolverOutput, check_sigmas, new_counter, sig, to_d
from .multistep import ab_combine


def _row(table, n: int, x: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    """Row ``n`` of ``table`` as ``(B, K)`` tensors. ``table.row`` may return ``(K,)`` (one table for the batch)
    or ``(B, K)`` (one sampled table per image, as in RDPO rollouts)."""
    row = table.row(n, dtype=x.dtype, device=x.device)
    return {k: (v.expand(batch, -1) if v.dim() == 1 else v) for k, v in row.items()}


def epd_points(x, d, s, t, row):
    """Intermediate noise levels ``s_k`` (B, K) and Euler-probed states ``y_k`` (B, K, ...)."""
    r = row["positions"]
    s_k = torch.exp(r * torch.log(t) + (1 - r) * torch.log(s))
    shape = (*s_k.shape, *([1] * (x.dim() - 1)))
    y = x.unsqueeze(1) + (s_k - s).reshape(shape) * d.unsqueeze(1)
    return s_k, y


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
        :class:`~epd.solvers.common.SolverOutput` with ``paper_nfe = 2 (N - 1) - [afs]`` (+1 if denoise_to_zero).
    """
    with torch.set_grad_enabled(grad):
        return _sample_epd(denoiser, x, sigmas, cond, table, callback, afs, plugin, max_order, parallel,
                           denoise_to_zero, return_trajectory, context, detach_between_steps)


def _sample_epd(denoiser, x, sigmas, cond, table, callback, afs, plugin, max_order, parallel, denoise_to_zero,
                return_trajectory, context, detach_between_steps):
    if table is None:
        raise ConfigError("table: the EPD solver needs a parameter table (EPDTable, snapshot path or predictor)")
    sigmas = check_sigmas(sigmas, allow_final_zero=False)
    n_steps = len(sigmas) - 1
    meta = getattr(table, "meta", {}) or {}
    table_steps = getattr(table, "num_steps", None)
    if table_steps is not None and table_steps != len(sigmas):
        raise ConfigError(f"sigmas: grid has {len(sigmas)} points but the EPD table has num_steps={table_steps}")
    if afs is None:
        afs = bool(meta.get("afs") or False)
    if plugin not in (None, "ipndm"):
        raise ConfigError(f"plugin: expected None or 'ipndm', got {plugin!r}")
    max_order = int(max_order or meta.get("max_order") or 4) if plugin else 1
    B = x.shape[0]
    D = new_counter(denoiser, x, cond, context)
    traj = [x] if return_trajectory else []
    history: list[torch.Tensor] = []
    K = None
    cond_k = None
    for n in range(n_steps):
        D.step = n
        s, t = sig(sigmas, n, x), sig(sigmas, n + 1, x)
        if afs and n == 0:
            d = x / torch.sqrt(1 + s**2)
        else:
            d = to_d(x, s, D(x, s, cond))
        if plugin:
            history.append(d)
            d = ab_combine(history, max_order)
            history = history[-(max_order - 1):] if max_order > 1 else []
        row = _row(table, n, x, B)
        if K is None:
            K = row["positions"].shape[1]
            cond_k = repeat_cond(cond, K) if parallel else cond
        s_k, y = epd_points(x, d, s, t, row)
        s_in = row["scale_time"] * s_k
        if parallel:
            y_flat = y.transpose(0, 1).reshape(K * B, *x.shape[1:])
            den = D(y_flat, s_in.transpose(0, 1).reshape(K * B), cond_k)
            den = den.reshape(K, B, *x.shape[1:]).transpose(0, 1)
        else:
            den = torch.stack([D(y[:, k], s_in[:, k], cond) for k in range(K)], 1)
        shape = (B, K, *([1] * (x.dim() - 1)))
        g = (y - den) / s_k.reshape(shape)
        coef = (row["weights"] * row["scale_dir"]).reshape(shape)
        x = x + (t - s) * (coef * g).sum(1)
        if traj:
            traj.append(x)
        if detach_between_steps:
            x = x.detach()
        if callback is not None:
            callback({"i": n, "x": x, "sigma": s, "sigma_next": t, "points": s_k})
    paper_nfe = 2 * n_steps - int(bool(afs))
    if denoise_to_zero:
        D.step = n_steps
        x = D(x, sig(sigmas, n_steps, x), cond)
        paper_nfe += 1
    return SolverOutput(x, D.calls, D.forward_passes, paper_nfe, traj)


def sample_epd_ipndm(denoiser, x, sigmas, **kw):
    """EPD-Plugin on iPNDM (ICCV EPD-Plugin)."""
    kw.setdefault("plugin", "ipndm")
    return sample_epd(denoiser, x, sigmas, **kw)
