"""The Backbone protocol: what a loaded backbone adapter offers a sampler around its denoiser.

The denoiser itself follows the core contract of :mod:`epd.denoiser` (coordinates, the K stacked points,
conditioning), which every adapter implements.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from ..denoiser import Denoiser

__all__ = ["Backbone"]


@runtime_checkable
class Backbone(Protocol):
    """A loaded backbone: the denoiser plus everything a sampler needs around it.

    Attributes:
        name (`str`): registry name (``digits``, ``gmm``, ``sd15``, ``sd3``, ``flux``).
        denoiser (:class:`~epd.denoiser.Denoiser`): CFG applied inside; K stacked points in one call.
        coords (`str`): the denoiser's coordinates (``"edm"`` or ``"flow"``).
        sigma_min (`float`), sigma_max (`float`): default grid range in those coordinates.
        default_schedule (`str`): schedule name used when none is given (see :mod:`epd.schedules`).
    """

    name: str
    denoiser: Denoiser
    coords: str
    sigma_min: float
    sigma_max: float
    default_schedule: str

    def weights(self) -> list[torch.Tensor]:
        """Every weight tensor of the loaded model (the stages that learn only a table freeze them)."""
        ...

    def prepare(self, prompts: list[str]) -> Any:
        """Conditioning for a prompt batch, computed once (text embeddings cached; labels for digits)."""

    def noise(self, seeds: list[int], sigma: float | None = None) -> torch.Tensor:
        """Initial states at noise level ``sigma`` (default ``sigma_max``; callers pass the first grid point) for the
        given seeds: ``randn`` from ``torch.Generator().manual_seed(seed)`` per seed (CPU generator, so the same on
        every device), scaled to the denoiser's coordinates."""

    def sigmas(self, num_points: int, schedule: str | None = None, **kw) -> torch.Tensor:
        """The grid of ``num_points`` = ``N`` points (``N - 1`` steps; decreasing, ending above 0) in the denoiser's
        coordinates. (The keyword is the adapters' own name for ``N``.)"""

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in ``[0, 1]`` from final states."""
