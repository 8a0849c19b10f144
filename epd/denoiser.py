"""The Denoiser contract shared by every backbone adapter and every solver (core layer: solvers, graphs and
point parallelism depend on it; backbone adapters implement it).

All solvers integrate the probability-flow ODE written in the form

    dx/dsigma = (x - D(x, sigma)) / sigma

which holds for EDM/VE models (``x = x0 + sigma * eps``, ``sigma`` the EDM noise level) and also, with
``sigma`` read as the flow time ``t``, for rectified-flow models (``x_t = (1 - t) x0 + t eps``). A backbone
adapter states which coordinates it presents (:attr:`Denoiser.coords`):

* ``"edm"``: the EDM convention of DESIGN.md. SD1.5 converts ``x_edm = x_vp / sqrt(abar)``,
  ``sigma = sqrt((1 - abar) / abar)``; flow models convert ``sigma = t / (1 - t)``, ``x_edm = x_t / (1 - t)``.
* ``"flow"``: native flow time, the variable the original EPD code stepped in for SD3/FLUX (spec §3.2).
  Only first-order steps coincide between the two; EPD tables trained by the original need ``"flow"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["Denoiser", "repeat_cond", "batch_of", "Prepared"]


@runtime_checkable
class Denoiser(Protocol):
    """A callable ``D(x, sigma, cond) -> x0_hat``.

    Attributes:
        coords (`str`): ``"edm"`` or ``"flow"`` (see module docstring).
        passes_per_eval (`int`): network forward passes per sample and evaluation (2 when the adapter doubles
            the batch for classifier-free guidance, 1 otherwise). Used for forward-pass accounting.
        sigma_min (`float`), sigma_max (`float`): the model's trained range in its own coordinates.

    The call receives ``x`` of shape ``(M, ...)`` where ``M`` is a multiple ``k * B`` of the conditioning batch
    ``B`` (K parallel points stacked point-major: ``[point_0 batch, point_1 batch, ...]``), ``sigma`` of shape
    ``(M,)`` or a scalar tensor, and ``cond`` prepared for ``B`` samples (see :func:`repeat_cond`).
    """

    coords: str
    passes_per_eval: int

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor: ...


@dataclass
class Prepared:
    """A conditioning object prepared once per prompt batch.

    Adapters subclass or use this to cache text embeddings. ``tensors`` hold per-sample tensors (batch first);
    ``extra`` holds batch-independent values (e.g. guidance scale, FLUX ``text_ids``).
    """

    tensors: dict
    extra: dict | None = None

    @property
    def batch(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def repeat(self, k: int) -> "Prepared":
        if k == 1:
            return self
        return Prepared({n: t.repeat(k, *([1] * (t.dim() - 1))) for n, t in self.tensors.items()}, self.extra)


def repeat_cond(cond: Any, k: int) -> Any:
    """Repeat conditioning ``k`` times point-major, matching ``torch.cat([x] * k)`` of the state."""
    if cond is None or k == 1:
        return cond
    if isinstance(cond, torch.Tensor):
        return cond.repeat(k, *([1] * (cond.dim() - 1)))
    if hasattr(cond, "repeat"):
        return cond.repeat(k)
    raise TypeError(f"cond of type {type(cond).__name__} cannot be repeated for parallel points; "
                    "use a Tensor or an object with a .repeat(k) method")


def batch_of(cond: Any, default: int) -> int:
    """Batch size a conditioning object was prepared for (``default`` when unconditional)."""
    if cond is None:
        return default
    if isinstance(cond, torch.Tensor):
        return cond.shape[0]
    return getattr(cond, "batch", default)
