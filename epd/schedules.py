"""Noise-level grids (spec §2). Every function returns ``N`` strictly decreasing float64 values (no terminal 0
unless the name says so), in the coordinates of the backbone they are meant for.

* :func:`edm_polynomial` — Karras et al. (rho), EDM/VE coordinates.
* :func:`time_uniform` — uniform (rho-warped) in VP time, mapped to EDM sigma (ICCV pixel models).
* :func:`logsnr` — uniform in log-sigma.
* :func:`discrete_vp` — the original's ``discrete`` spacing for SD1.5-style VP models (continuous VP time from a
  discrete ``alphas_cumprod`` table); :func:`vp_spacing` — diffusers' ``leading``/``trailing``/``linspace`` spacings.
* Flow matching (SD3/FLUX shifts, in flow time) lives in :mod:`epd.flow_schedules`; its grid functions are
  re-exported here so that every grid is reachable from this module.
"""

from __future__ import annotations

import copy
import math

import torch

from .errors import ConfigError
from .flow_schedules import FLOW_SCHEDULES, calculate_flux_mu, dpm_flow_sigmas, flux_sigmas, sd3_sigmas

__all__ = ["edm_polynomial", "time_uniform", "logsnr", "scaled_linear_alphas_cumprod", "VPTable", "discrete_vp",
           "vp_spacing", "get_schedule", "SCHEDULES", "sd3_sigmas", "flux_sigmas", "dpm_flow_sigmas",
           "calculate_flux_mu"]


def _check(N: int, sigma_min: float, sigma_max: float):
    if int(N) != N or N < 2:
        raise ConfigError(f"num_points: need an integer >= 2, got {N}")
    if not (0 < sigma_min < sigma_max) or not math.isfinite(sigma_max):
        raise ConfigError(f"sigma range: need 0 < sigma_min < sigma_max < inf, got [{sigma_min}, {sigma_max}]")


def edm_polynomial(N: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """``sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``."""
    _check(N, sigma_min, sigma_max)
    u = torch.linspace(0, 1, N, dtype=torch.float64)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + u * (b - a)) ** rho


def logsnr(N: int, sigma_min: float = 0.002, sigma_max: float = 80.0) -> torch.Tensor:
    """Uniform in ``lambda = -log sigma``."""
    _check(N, sigma_min, sigma_max)
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), N, dtype=torch.float64))


def time_uniform(N: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 1.0,
                 eps: float = 1e-3) -> torch.Tensor:
    """VP time ``s_i = (1 + u (eps^(1/rho) - 1))^rho`` mapped by ``sigma(s) = sqrt(exp(beta_d s^2 / 2 + beta_min s) - 1)``
    with ``beta_d, beta_min`` solved so that ``sigma(1) = sigma_max`` and ``sigma(eps) = sigma_min``."""
    _check(N, sigma_min, sigma_max)
    # log(1 + sigma^2) = beta_d s^2 / 2 + beta_min s at s = 1 and s = eps: a 2x2 linear system.
    l1, le = math.log1p(sigma_max**2), math.log1p(sigma_min**2)
    beta_d = 2 * (l1 - le / eps) / (1 - eps)
    beta_min = l1 - beta_d / 2
    u = torch.linspace(0, 1, N, dtype=torch.float64)
    s = (1 + u * (eps ** (1 / rho) - 1)) ** rho
    return torch.sqrt(torch.expm1(0.5 * beta_d * s**2 + beta_min * s))


def scaled_linear_alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012,
                                 num_train_timesteps: int = 1000) -> torch.Tensor:
    """``alphas_cumprod`` of the LDM/SD1.5 "scaled_linear" beta schedule (float64)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


class VPTable:
    """Continuous VP time <-> EDM sigma for a discrete ``alphas_cumprod`` table (the original's ``CFGPrecond``).

    ``log alpha(t)`` with ``alpha = sqrt(abar)`` is interpolated piecewise-linearly on ``t_i = i / T``,
    ``i = 1..T``; ``sigma(t) = sqrt(1 - alpha^2) / alpha``. The network's timestep input is ``T t - 1``.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, device=None):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64, device=device)
        self.T = len(ac)
        self.t_grid = torch.arange(1, self.T + 1, dtype=torch.float64, device=ac.device) / self.T
        self.log_alpha = 0.5 * torch.log(ac)
        # log alpha decreases along t: the inverse lookup reads it flipped (increasing), so neither direction
        # needs a data-dependent branch (a host sync on a GPU, and no CUDA-graph capture)
        self._la_up, self._t_by_la = self.log_alpha.flip(0), self.t_grid.flip(0)

    def to(self, device) -> "VPTable":
        """The same table with its tensors on ``device`` (lookups then stay there)."""
        out = copy.copy(self)
        for name in ("t_grid", "log_alpha", "_la_up", "_t_by_la"):
            setattr(out, name, getattr(self, name).to(device))
        return out

    @staticmethod
    def _interp(x, xp, fp):
        """Piecewise-linear interpolation on increasing ``xp`` (linear extrapolation at the ends)."""
        x = torch.as_tensor(x, dtype=torch.float64, device=xp.device)
        idx = torch.clamp(torch.searchsorted(xp, x) - 1, 0, len(xp) - 2)
        x0, x1, y0, y1 = xp[idx], xp[idx + 1], fp[idx], fp[idx + 1]
        return y0 + (x - x0) * (y1 - y0) / (x1 - x0)

    def sigma(self, t) -> torch.Tensor:
        la = self._interp(t, self.t_grid, self.log_alpha)
        return torch.sqrt(torch.expm1(-2 * la))

    def sigma_inv(self, sigma) -> torch.Tensor:
        la = -0.5 * torch.log1p(torch.as_tensor(sigma, dtype=torch.float64, device=self.t_grid.device) ** 2)
        return self._interp(la, self._la_up, self._t_by_la)

    @property
    def sigma_min(self) -> float:
        return float(self.sigma(torch.tensor(1.0 / self.T)))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma(torch.tensor(1.0)))


def discrete_vp(N: int, vp: VPTable | None = None, sigma_min: float | None = None, sigma_max: float | None = None,
                rho: float = 1.0, eps: float = 1e-3) -> torch.Tensor:
    """The original's ``discrete`` spacing: uniform (rho-warped) in continuous VP time between ``sigma_inv(sigma_max)``
    and ``sigma_inv(sigma_min)``. Defaults: SD1.5's table, ``sigma_min = sigma(eps)``, ``sigma_max = sigma(1)``.

    The original does not raise ``s_max`` to ``1/rho`` (spec §2 quirk); with ``rho = 1`` (all shipped models) the
    two readings agree. We implement the consistent formula and refuse ``rho != 1`` silently differing: pass
    ``rho`` explicitly to get the consistent version.
    """
    vp = vp or VPTable(scaled_linear_alphas_cumprod())
    sigma_min = float(vp.sigma(torch.tensor(eps))) if sigma_min is None else sigma_min
    sigma_max = float(vp.sigma(torch.tensor(1.0))) if sigma_max is None else sigma_max
    _check(N, sigma_min, sigma_max)
    s_max, s_min = vp.sigma_inv(torch.tensor(sigma_max)), vp.sigma_inv(torch.tensor(sigma_min))
    u = torch.linspace(0, 1, N, dtype=torch.float64)
    s = (s_max ** (1 / rho) + u * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    return vp.sigma(s)


def vp_spacing(num_steps: int, alphas_cumprod: torch.Tensor | None = None, spacing: str = "leading",
               steps_offset: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' integer timesteps and their EDM sigmas for ``num_steps`` steps (no terminal 0 appended).

    Returns:
        ``(timesteps (long), sigmas (float64))`` with ``sigma = sqrt((1 - abar) / abar)``.
    """
    ac = scaled_linear_alphas_cumprod() if alphas_cumprod is None else torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    T = len(ac)
    if spacing == "leading":
        ratio = T // num_steps
        ts = torch.arange(num_steps - 1, -1, -1, dtype=torch.long) * ratio + steps_offset
    elif spacing == "trailing":
        ratio = T / num_steps
        ts = torch.round(torch.arange(T, 0, -ratio, dtype=torch.float64)).long() - 1
    elif spacing == "linspace":
        ts = torch.linspace(0, T - 1, num_steps, dtype=torch.float64).round().flip(0).long()
    else:
        raise ConfigError(f"spacing: unknown {spacing!r}; accepted: leading, trailing, linspace")
    ab = ac[ts]
    return ts, torch.sqrt((1 - ab) / ab)


SCHEDULES = ("edm", "polynomial", "logsnr", "time_uniform", "discrete") + FLOW_SCHEDULES


def get_schedule(name: str, N: int, *, sigma_min: float | None = None, sigma_max: float | None = None,
                 rho: float | None = None, **kw) -> torch.Tensor:
    """Grid by name (``edm``/``polynomial``, ``logsnr``, ``time_uniform``, ``discrete``; flow-matching names are
    served by the backbone adapters). Unknown names raise a ConfigError listing the accepted ones."""
    if name in ("edm", "polynomial"):
        return edm_polynomial(N, sigma_min or 0.002, sigma_max or 80.0, 7.0 if rho is None else rho)
    if name == "logsnr":
        return logsnr(N, sigma_min or 0.002, sigma_max or 80.0)
    if name == "time_uniform":
        return time_uniform(N, sigma_min or 0.002, sigma_max or 80.0, 1.0 if rho is None else rho)
    if name == "discrete":
        return discrete_vp(N, kw.get("vp"), sigma_min, sigma_max, 1.0 if rho is None else rho)
    if name in FLOW_SCHEDULES:
        raise ConfigError(f"schedule {name!r} depends on the flow backbone (shift/mu); use backbone.sigmas()")
    raise ConfigError(f"schedule: unknown name {name!r}; accepted: {list(SCHEDULES)}")
