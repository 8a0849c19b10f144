"""LD3 (Tong et al., ICLR 2025, "Learning to Discretize Denoising Diffusion ODEs"): a learned ``N``-point time grid
for a base solver, trained against a teacher with a relaxed objective.

The grid keeps its ends (``sigma_max``, ``sigma_min``) and learns where the ``N - 2`` inner points sit: the ``N - 1``
step lengths in ``log sigma`` are a softmax of free logits times the total length, so every grid is strictly
decreasing. The relaxed teacher objective lets the student start anywhere in a small ball around the teacher's
noise (one free offset per training trajectory, projected back into the ball after every update)::

    min_{grid, x'}  || Psi_grid(x') - x_teacher ||^2     subject to  || x' - x_T || <= radius * sigma_max * sqrt(dim)

``Psi_grid`` is the base solver on the learned grid (``grad=True``). ``radius = 0`` is the plain distillation loss.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from .common import check_sigmas

__all__ = ["GridParameters", "project_to_ball", "ball_radius"]


class GridParameters(nn.Module):
    """A learnable time grid with fixed ends, initialised to reproduce ``base`` (``N`` points).

    ``log sigma_i = log sigma_max - L * cumsum(softmax(logits))[:i]`` with ``L = log(sigma_max / sigma_min)``.
    """

    def __init__(self, base: torch.Tensor, frozen: bool = False):
        super().__init__()
        base = check_sigmas(base, allow_final_zero=False, name="ld3 base grid").to(torch.float64)
        if len(base) < 3:
            raise ConfigError("ld3: a grid of 2 points has no inner point to learn; raise the NFE")
        self.register_buffer("log_ends", torch.log(base[[0, -1]]))
        steps = -torch.diff(torch.log(base))
        self.logits = nn.Parameter(torch.log(steps / steps.sum()), requires_grad=not frozen)

    def forward(self) -> torch.Tensor:
        """The grid (float64, differentiable in the logits)."""
        hi, lo = self.log_ends
        frac = torch.cumsum(torch.softmax(self.logits, 0), 0)[:-1]
        inner = hi - (hi - lo) * frac
        return torch.exp(torch.cat([hi.reshape(1), inner, lo.reshape(1)]))


def ball_radius(radius: float, sigma_max: float, sample_shape) -> float:
    """The relaxed objective's ball radius in state units: ``radius * sigma_max * sqrt(dim)`` (``radius`` is a
    fraction of the teacher noise's typical norm)."""
    if radius < 0:
        raise ConfigError(f"ld3.radius: must be >= 0, got {radius}")
    return float(radius) * float(sigma_max) * math.sqrt(math.prod(sample_shape))


@torch.no_grad()
def project_to_ball(offsets: torch.Tensor, radius: float) -> None:
    """Scale each row of ``offsets`` in place so its norm is at most ``radius`` (all zero when ``radius == 0``)."""
    if radius <= 0:
        offsets.zero_()
        return
    norms = offsets.flatten(1).norm(dim=1).clamp_min(1e-30)
    scale = (radius / norms).clamp(max=1.0)
    offsets.mul_(scale.reshape(-1, *([1] * (offsets.dim() - 1))))
