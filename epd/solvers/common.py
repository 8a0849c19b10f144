"""Shared pieces of every solver: argument checks, NFE/forward-pass accounting, the ODE slope."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..denoiser import batch_of
from ..errors import ConfigError, NonFiniteError

__all__ = ["SolverOutput", "CountingDenoiser", "check_sigmas", "check_final_finite", "to_d", "append_zero",
           "no_grad_unless_asked"]


@dataclass
class SolverOutput:
    """Result of one solver run.

    Attributes:
        x (`torch.Tensor`): final state (at the last grid point, or the denoised estimate when the grid ends at 0).
        nfe (`int`): sequential denoiser evaluations (one batched call over K parallel points counts once).
        forward_passes (`int`): network forward passes per sample, counting every parallel point and the
            classifier-free-guidance doubling.
        paper_nfe (`int`): NFE as the paper's tables count it (same as ``nfe`` for baselines; for EPD
            ``2 (N - 1) - [afs]``).
        trajectory (`list`): states at every grid point when requested.
    """

    x: torch.Tensor
    nfe: int
    forward_passes: int
    paper_nfe: int
    trajectory: list = field(default_factory=list)


class CountingDenoiser:
    """Wraps a denoiser to count sequential calls and per-sample forward passes, and to catch NaN/inf.

    ``context`` is appended to the NaN/inf message: a string, or one label per sample of the batch (e.g. its seed
    and prompt), in which case the message names the first sample whose output is not finite.
    """

    def __init__(self, denoiser: Callable, batch: int, context: str | list[str] = ""):
        self.inner = denoiser
        self.batch = batch
        self.calls = 0
        self.points = 0
        self.context = context
        # a denoiser that must not synchronise with the host (CUDA graphs) asks for one check on the final state
        self.check_each = not getattr(denoiser, "defer_finite_check", False)
        self.step = None
        self.passes_per_eval = int(getattr(denoiser, "passes_per_eval", 1))
        self.coords = getattr(denoiser, "coords", "edm")

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        self.calls += 1
        self.points += max(1, x.shape[0] // max(self.batch, 1))
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if sigma.dim() == 0:
            sigma = sigma.expand(x.shape[0])
        out = self.inner(x, sigma, cond)
        if self.check_each and (bad := nonfinite_rows(out)):
            raise NonFiniteError(
                f"denoiser returned NaN/inf at step {self.step} (sigma={sigma[bad[0]].item():.6g}) for batch rows "
                f"{_rows(bad)}{describe_rows(bad, self.context, self.batch)}")
        return out

    @property
    def forward_passes(self) -> int:
        return self.points * self.passes_per_eval


def nonfinite_rows(t: torch.Tensor) -> list[int]:
    """Indices of the batch rows of ``t`` holding NaN/inf (empty when all is finite: one host sync)."""
    if torch.isfinite(t).all():
        return []
    return (~torch.isfinite(t.reshape(t.shape[0], -1))).any(1).nonzero().flatten().tolist()


def describe_rows(bad: list[int], context: str | list[str], batch: int) -> str:
    """``context`` for a NaN/inf message: the string itself, or the label of the first affected sample (rows of K
    parallel points are stacked point-major, so row ``r`` is sample ``r % batch``)."""
    if isinstance(context, str):
        return context
    samples = sorted({r % max(batch, 1) for r in bad})
    if not samples or samples[-1] >= len(context):
        return ""
    return f" ({context[samples[0]]}{f'; {len(samples)} samples affected' if len(samples) > 1 else ''})"


def check_final_finite(x: torch.Tensor, context: str | list[str] = "") -> None:
    """One NaN/inf check on a final state: the deferred form of :class:`CountingDenoiser`'s per-call check for
    denoisers that must not synchronise every call (NaN propagates to the end)."""
    if bad := nonfinite_rows(x):
        raise NonFiniteError(f"the final state is NaN/inf for batch rows {_rows(bad)}"
                             f"{describe_rows(bad, context, x.shape[0])}: the denoiser produced a non-finite value "
                             "during sampling")


def _rows(bad: list[int]) -> str:
    return f"{bad[:8]}{' ...' if len(bad) > 8 else ''}"


def check_sigmas(sigmas: torch.Tensor, *, allow_final_zero: bool = True, name: str = "sigmas") -> torch.Tensor:
    """Validate a noise-level grid: 1-D, at least two values, finite, strictly decreasing, positive except
    possibly a final 0."""
    sigmas = torch.as_tensor(sigmas)
    if sigmas.dim() != 1 or sigmas.numel() < 2:
        raise ConfigError(f"{name}: expected a 1-D grid of at least 2 noise levels, got shape {tuple(sigmas.shape)}")
    if not torch.isfinite(sigmas).all():
        raise ConfigError(f"{name}: contains NaN or inf: {sigmas.tolist()}")
    if not (sigmas[1:] < sigmas[:-1]).all():
        raise ConfigError(f"{name}: must be strictly decreasing, got {[round(s, 6) for s in sigmas.tolist()]}")
    positive = sigmas[:-1] if allow_final_zero else sigmas
    if not (positive > 0).all() or sigmas[-1] < 0:
        raise ConfigError(f"{name}: noise levels must be > 0{' (a final 0 is allowed)' if allow_final_zero else ''}, "
                          f"got {sigmas.tolist()}")
    return sigmas


def to_d(x: torch.Tensor, sigma, denoised: torch.Tensor) -> torch.Tensor:
    """ODE slope ``dx/dsigma = (x - D(x, sigma)) / sigma``."""
    return (x - denoised) / _bcast(sigma, x)


def _bcast(v, x: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    if v.dim() == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (x.dim() - 1)))


def append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def new_counter(denoiser, x, cond, context=""):
    return CountingDenoiser(denoiser, batch_of(cond, x.shape[0]), context)


def sig(sigmas: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
    """Noise level ``i`` as a scalar tensor in x's dtype/device (a fill, not a host-to-device copy: no sync)."""
    if sigmas.device == x.device:
        return sigmas[i].to(dtype=x.dtype)
    return torch.full((), float(sigmas[i]), dtype=x.dtype, device=x.device)


def log_ratio(a: float, b: float) -> float:
    return math.log(a) - math.log(b)


def no_grad_unless_asked(fn):
    """Run ``fn`` without autograd (as ``torch.no_grad``) unless called with ``grad=True``: learned time grids
    (LD3) differentiate a baseline's final state with respect to its noise levels and initial state."""

    @functools.wraps(fn)
    def wrapper(*args, grad: bool = False, **kw):
        with torch.set_grad_enabled(grad):
            return fn(*args, **kw)

    return wrapper
