"""Flow-matching time grids for SD3 and FLUX (spec §2), in native flow time ``t`` (``x_t = (1 - t) x0 + t eps``);
core grids beside :mod:`epd.schedules` (which re-exports them), used by the SD3/FLUX adapters.

Three families, each for ``N`` grid points (both ends counted, ``N - 1`` steps):

* ``"flowmatch"`` — the original EPD code's grid: diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps(N)``
  with the terminal 0 dropped, so it ends above 0 (SD3: static shift applied twice at the small end; FLUX:
  ``s = linspace(1, 1/1000, N)`` shifted with ``mu``).
* ``"flowmatch_official"`` — the grid the official diffusers pipeline uses for ``N - 1`` steps, ending at 0
  (SD3: the same scheduler grid with ``N - 1`` points plus 0; FLUX: ``sigmas = linspace(1, 1/(N-1), N-1)``
  shifted with ``mu``, plus 0). For FLUX it differs from ``"flowmatch"`` (spec §2 rough edge).
* ``"flowmatch_dpm"`` — the grid of diffusers' ``DPMSolverMultistepScheduler(use_flow_sigmas=True)``
  for ``N - 1`` steps: starts below 1 (finite in EDM coordinates) and ends at 0.

All functions return float64 tensors. ``flow_to_edm``/``edm_to_flow`` convert between flow time and the EDM
noise level ``sigma = t / (1 - t)``.
"""

from __future__ import annotations

import math

import torch

from .errors import ConfigError

__all__ = ["FLOW_SCHEDULES", "calculate_flux_mu", "static_shift", "dynamic_shift", "sd3_sigmas", "flux_sigmas",
           "dpm_flow_sigmas", "flow_to_edm", "edm_to_flow"]

FLOW_SCHEDULES = ("flowmatch", "flowmatch_official", "flowmatch_dpm")


def calculate_flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                      base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift ``mu = L m + b`` (linear in the packed token count ``L``).

    Args:
        image_seq_len (`int`): packed latent tokens, ``(latent_h / 2) * (latent_w / 2)`` (4096 at 1024x1024).

    Returns:
        `float`: ``mu`` (1.15 at 4096 tokens, 0.5 at 256).
    """
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def static_shift(s: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's shift ``shift * s / (1 + (shift - 1) s)``."""
    return shift * s / (1 + (shift - 1) * s)


def dynamic_shift(s: torch.Tensor, mu: float) -> torch.Tensor:
    """FLUX's exponential time shift ``e^mu / (e^mu + 1/s - 1)`` (``s = 0`` maps to 0)."""
    s = torch.as_tensor(s, dtype=torch.float64)
    em = torch.full_like(s, math.exp(mu))  # tensor / tensor division keeps t(1) == 1 exactly
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return torch.where(s > 0, em / (em + (1 / safe - 1)), torch.zeros_like(s))


def _check_n(N: int) -> int:
    if int(N) != N or N < 2:
        raise ConfigError(f"num_points: need an integer >= 2, got {N}")
    return int(N)


def _append_zero(s: torch.Tensor) -> torch.Tensor:
    return torch.cat([s, s.new_zeros(1)])


def sd3_sigmas(N: int, shift: float = 3.0, schedule: str = "flowmatch",
               num_train_timesteps: int = 1000) -> torch.Tensor:
    """SD3 grids (static shift, no dynamic shifting).

    Args:
        N (`int`): grid points (``N - 1`` steps).
        shift (`float`): the scheduler's ``shift`` (3.0 for SD3-Medium).
        schedule (`str`): ``"flowmatch"`` (original, ends above 0), ``"flowmatch_official"`` (pipeline, ends at 0)
            or ``"flowmatch_dpm"``.

    Returns:
        `torch.Tensor`: ``N`` decreasing flow times.
    """
    N = _check_n(N)
    if schedule == "flowmatch_dpm":
        return dpm_flow_sigmas(N, shift, num_train_timesteps)
    # The scheduler's own sigma_min is already shifted once; set_timesteps shifts the linspace again.
    s_min = float(static_shift(torch.tensor(1.0 / num_train_timesteps, dtype=torch.float64), shift))
    if schedule == "flowmatch":
        return static_shift(torch.linspace(1.0, s_min, N, dtype=torch.float64), shift)
    if schedule == "flowmatch_official":
        return _append_zero(static_shift(torch.linspace(1.0, s_min, N - 1, dtype=torch.float64), shift))
    raise ConfigError(f"schedule: unknown flow schedule {schedule!r}; accepted: {list(FLOW_SCHEDULES)}")


def flux_sigmas(N: int, mu: float, schedule: str = "flowmatch",
                num_train_timesteps: int = 1000) -> torch.Tensor:
    """FLUX grids (dynamic shifting with ``mu``).

    Args:
        N (`int`): grid points (``N - 1`` steps).
        mu (`float`): the shift (see :func:`calculate_flux_mu`; 1.15 at 1024x1024).
        schedule (`str`): ``"flowmatch"`` (original: ``s = linspace(1, 1/1000, N)``, ends above 0),
            ``"flowmatch_official"`` (``FluxPipeline``: ``linspace(1, 1/(N-1), N-1)`` then 0) or ``"flowmatch_dpm"``.

    Returns:
        `torch.Tensor`: ``N`` decreasing flow times.
    """
    N = _check_n(N)
    if schedule == "flowmatch":
        return dynamic_shift(torch.linspace(1.0, 1.0 / num_train_timesteps, N, dtype=torch.float64), mu)
    if schedule == "flowmatch_official":
        steps = N - 1
        return _append_zero(dynamic_shift(torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64), mu))
    if schedule == "flowmatch_dpm":
        return dpm_flow_sigmas(N, math.exp(mu), num_train_timesteps)
    raise ConfigError(f"schedule: unknown flow schedule {schedule!r}; accepted: {list(FLOW_SCHEDULES)}")


def dpm_flow_sigmas(N: int, shift: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Grid of ``DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift)`` for ``N - 1`` steps.

    ``s = 1 - linspace(1, 1/T, N)`` reversed without its 0, shifted statically, then a terminal 0. With dynamic
    shifting diffusers sets ``flow_shift = e^mu``, which is the same map as :func:`dynamic_shift`.
    """
    N = _check_n(N)
    s = 1.0 - torch.linspace(1.0, 1.0 / num_train_timesteps, N, dtype=torch.float64)
    return _append_zero(static_shift(s.flip(0)[:-1], shift))


def flow_to_edm(t: torch.Tensor) -> torch.Tensor:
    """EDM noise level ``t / (1 - t)`` of flow time ``t`` (needs ``t < 1``)."""
    t = torch.as_tensor(t)
    if (t >= 1).any():
        raise ConfigError("sigmas: flow time t = 1 (pure noise) has no finite EDM noise level; use coords 'flow' "
                          "or a grid that starts below 1 (schedule 'flowmatch_dpm')")
    return t / (1 - t)


def edm_to_flow(sigma: torch.Tensor) -> torch.Tensor:
    """Flow time ``sigma / (1 + sigma)`` of an EDM noise level."""
    sigma = torch.as_tensor(sigma)
    return sigma / (1 + sigma)
