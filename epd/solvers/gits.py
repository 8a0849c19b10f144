"""GITS (Chen et al., ICML 2024, "On the trajectory regularity of ODE-based diffusion sampling"): a time schedule
found by dynamic programming over a coarse-to-fine cost.

On a fine grid ``sigma_0 > ... > sigma_{G-1}`` a few teacher trajectories give accurate states ``x_i``. The cost of
one coarse step from fine point ``i`` to fine point ``j > i`` is the distance between an Euler step from the
teacher state and the teacher state at ``j``, averaged over trajectories::

    cost[i, j] = mean_b || x_i + (sigma_j - sigma_i) * d_i - x_j ||      d_i = (x_i - D(x_i, sigma_i)) / sigma_i

The schedule is the path ``0 = i_0 < i_1 < ... < i_S = G - 1`` of ``S`` steps with the least summed cost; its noise
levels are then used by any solver at ``S`` steps (iPNDM, DPM-Solver++(2M)), as in the paper.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .common import check_sigmas, to_d

__all__ = ["euler_step_costs", "cheapest_path", "gits_sigmas"]


def euler_step_costs(states: torch.Tensor, slopes: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The ``(G, G)`` coarse-to-fine cost (``inf`` where ``j <= i``).

    Args:
        states (`torch.Tensor` of shape `(B, G, ...)`): teacher states at the ``G`` fine points.
        slopes (`torch.Tensor` of shape `(B, G, ...)`): ``d_i`` at those states (the last is not used).
        sigmas (`torch.Tensor` of shape `(G,)`): the fine grid.
    """
    sigmas = check_sigmas(sigmas).to(torch.float64)
    G = len(sigmas)
    if states.shape[1] != G or slopes.shape[:2] != states.shape[:2]:
        raise ConfigError(f"gits: states {tuple(states.shape)} and slopes {tuple(slopes.shape)} do not match a fine "
                          f"grid of {G} points")
    x, d = states.flatten(2).double(), slopes.flatten(2).double()
    cost = torch.full((G, G), float("inf"), dtype=torch.float64)
    for i in range(G - 1):
        h = (sigmas[i + 1:] - sigmas[i]).reshape(1, -1, 1)
        pred = x[:, i:i + 1] + h * d[:, i:i + 1]
        cost[i, i + 1:] = (pred - x[:, i + 1:]).norm(dim=2).mean(0)
    return cost


def cheapest_path(cost: torch.Tensor, steps: int) -> list[int]:
    """Indices ``0 = i_0 < ... < i_steps = G - 1`` minimising ``sum_k cost[i_k, i_{k+1}]`` (dynamic programming;
    ties go to the earliest predecessor)."""
    G = cost.shape[0]
    if cost.shape != (G, G):
        raise ConfigError(f"gits: the cost must be square, got {tuple(cost.shape)}")
    if not 1 <= steps <= G - 1:
        raise ConfigError(f"gits: {steps} steps need a fine grid of more than {steps} points, it has {G}; "
                          "raise the fine grid's points or lower the NFE")
    inf = float("inf")
    best = torch.full((steps + 1, G), inf, dtype=torch.float64)  # best[k, j]: least cost to reach j in k steps
    prev = torch.zeros((steps + 1, G), dtype=torch.long)
    best[0, 0] = 0.0
    c = cost.double()
    for k in range(1, steps + 1):
        total = best[k - 1].unsqueeze(1) + c  # (i, j): reach i in k-1 steps, then i -> j
        best[k], prev[k] = total.min(0)
    if best[steps, G - 1] == inf:
        raise ConfigError("gits: no finite path through the cost")
    path = [G - 1]
    for k in range(steps, 0, -1):
        path.append(int(prev[k, path[-1]]))
    return path[::-1]


@torch.no_grad()
def gits_sigmas(denoiser, states: torch.Tensor, sigmas: torch.Tensor, steps: int, cond=None) -> tuple[torch.Tensor, list]:
    """GITS' schedule of ``steps`` steps from teacher ``states`` ``(B, G, ...)`` on the fine grid ``sigmas``;
    returns ``(coarse sigmas, fine indices)``. Costs ``G - 1`` evaluations per trajectory for the slopes."""
    B = len(states)
    slopes = [to_d(states[:, i], float(s), denoiser(states[:, i], torch.full((B,), float(s), dtype=states.dtype,
                                                                               device=states.device), cond))
              for i, s in enumerate(sigmas[:-1].tolist())]
    slopes = torch.stack(slopes + [torch.zeros_like(states[:, 0])], 1)
    path = cheapest_path(euler_step_costs(states, slopes, sigmas), steps)
    return sigmas[path].clone(), path
