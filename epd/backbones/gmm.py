"""An analytic Gaussian-mixture backbone: the exact posterior mean at every noise level, class-conditional.

Data ``x0 ~ sum_c pi_c N(mu_c, s_c^2 I)``; each component belongs to a class. At EDM noise level ``sigma`` the
noisy marginal of component ``c`` is ``N(mu_c, (s_c^2 + sigma^2) I)`` and

    D(x, sigma) = E[x0 | x] = sum_c gamma_c(x) (mu_c + s_c^2 / (s_c^2 + sigma^2) (x - mu_c)),

with responsibilities ``gamma_c`` over the components of the conditioning class (all components when
unconditional). Classifier-free guidance ``D_u + w (D_c - D_u)`` is applied inside. The probability-flow ODE
is then known exactly up to integration, and :func:`reference_solution` integrates it to ~1e-10.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..denoiser import repeat_cond
from ..errors import ConfigError
from .adapter import BackboneAdapter

__all__ = ["GMM", "GMMDenoiser", "GMMBackbone", "reference_solution", "make_gmm"]


@dataclass
class GMM:
    """Mixture parameters: ``means (C, dim)``, ``stds (C,)``, ``weights (C,)``, ``labels (C,)`` (class of each)."""

    means: torch.Tensor
    stds: torch.Tensor
    weights: torch.Tensor
    labels: torch.Tensor

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """Exact ``E[x0 | x_sigma]`` for flat ``x (B, dim)``, ``sigma (B,)``, optional ``label (B,)`` (-1 = unconditional)."""
        dt = x.dtype
        mu, s2, w = self.means.to(x), (self.stds.to(x) ** 2), self.weights.to(x)
        var = s2[None, :] + sigma.to(dt)[:, None] ** 2  # (B, C)
        diff = x[:, None, :] - mu[None]  # (B, C, dim)
        logp = (torch.log(w)[None] - 0.5 * (diff**2).sum(-1) / var - 0.5 * self.dim * torch.log(var))
        if label is not None:
            mask = (self.labels.to(x.device)[None, :] == label[:, None]) | (label[:, None] < 0)
            logp = logp.masked_fill(~mask, -math.inf)
        gamma = torch.softmax(logp, dim=1)
        post = mu[None] + (s2[None, :] / var)[..., None] * diff
        return (gamma[..., None] * post).sum(1)

    def sample(self, n: int, generator: torch.Generator, label: int | None = None) -> torch.Tensor:
        w = self.weights.clone()
        if label is not None:
            w = w * (self.labels == label)
        comp = torch.multinomial(w / w.sum(), n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype)
        return self.means[comp] + self.stds[comp, None] * noise


def make_gmm(dim: int = 8, num_classes: int = 2, per_class: int = 2, seed: int = 0,
             std_range: tuple[float, float] = (0.3, 0.6), dtype=torch.float64) -> GMM:
    """A reproducible random mixture with well-separated but overlapping components."""
    g = torch.Generator().manual_seed(seed)
    C = num_classes * per_class
    means = torch.randn(C, dim, generator=g, dtype=dtype)
    stds = std_range[0] + (std_range[1] - std_range[0]) * torch.rand(C, generator=g, dtype=dtype)
    weights = 0.5 + torch.rand(C, generator=g, dtype=dtype)
    labels = torch.arange(C) // per_class
    return GMM(means, stds, weights / weights.sum(), labels)


class GMMDenoiser:
    """Denoiser over the GMM in EDM coordinates, with optional classifier-free guidance.

    ``cond`` is a label tensor ``(B,)`` (``-1`` = unconditional) or None. States may have any trailing shape whose
    size is ``dim``. With ``guidance != 1`` the conditional and unconditional branches are evaluated in one doubled
    batch (``passes_per_eval = 2``), as a real CFG backbone does.
    """

    coords = "edm"

    def __init__(self, gmm: GMM, guidance: float = 1.0):
        self.gmm = gmm
        self.guidance = float(guidance)
        self.passes_per_eval = 1 if self.guidance == 1.0 else 2
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        self.calls += 1
        shape = x.shape
        flat = x.reshape(shape[0], -1)
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(shape[0]) \
            if torch.as_tensor(sigma).dim() == 0 else sigma.to(x)
        if cond is None:
            return self.gmm.denoise(flat, sigma).reshape(shape)
        labels = cond
        if labels.shape[0] != shape[0]:
            if shape[0] % labels.shape[0]:
                raise ConfigError(f"cond: batch {labels.shape[0]} does not divide state batch {shape[0]}")
            labels = repeat_cond(labels, shape[0] // labels.shape[0])
        if self.guidance == 1.0:
            return self.gmm.denoise(flat, sigma, labels).reshape(shape)
        both = self.gmm.denoise(torch.cat([flat, flat]), torch.cat([sigma, sigma]),
                                torch.cat([labels, torch.full_like(labels, -1)]))
        d_c, d_u = both.chunk(2)
        return (d_u + self.guidance * (d_c - d_u)).reshape(shape)


class GMMBackbone(BackboneAdapter):
    """The GMM as a :class:`~epd.backbones.base.Backbone` (prompts ``"0"``, ``"1"``, ... name classes).

    Analytic: no weights, nothing to train or check, no capability of :mod:`epd.backbones.adapter`.
    """

    name = "gmm"
    coords = "edm"
    default_schedule = "edm"

    def __init__(self, gmm: GMM | None = None, guidance: float = 1.0, sigma_min: float = 0.002, sigma_max: float = 80.0):
        self.gmm = gmm or make_gmm()
        self.denoiser = GMMDenoiser(self.gmm, guidance)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    @classmethod
    def from_section(cls, section: dict, device: str = "cpu", **_) -> "GMMBackbone":
        """The mixture of ``section["gmm"]`` (:func:`make_gmm` arguments) with ``section["guidance"]``."""
        return cls(make_gmm(**section.get("gmm", {})), guidance=float(section.get("guidance", 1.0)))

    def prepare(self, prompts: list[str]) -> torch.Tensor:
        try:
            labels = [int(p) for p in prompts]
        except ValueError:
            raise ConfigError(f"prompts: the GMM backbone takes class indices 0..{self.gmm.num_classes - 1}, got {prompts[:3]}") from None
        if any(not 0 <= v < self.gmm.num_classes for v in labels):
            raise ConfigError(f"prompts: class index out of range 0..{self.gmm.num_classes - 1}: {labels}")
        return torch.tensor(labels)

    def noise(self, seeds: list[int], sigma: float | None = None) -> torch.Tensor:
        return torch.stack([torch.randn(self.gmm.dim, generator=torch.Generator().manual_seed(int(s)),
                                        dtype=self.gmm.means.dtype) for s in seeds]) * (
            self.sigma_max if sigma is None else float(sigma))

    def sigmas(self, num_points: int, schedule: str | None = None, **kw) -> torch.Tensor:
        from ..schedules import get_schedule

        return get_schedule(schedule or self.default_schedule, num_points, sigma_min=self.sigma_min,
                            sigma_max=self.sigma_max, **kw)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x


BACKBONE = GMMBackbone


def reference_solution(denoiser, x: torch.Tensor, sigma_from: float, sigma_to: float, cond=None,
                       rtol: float = 1e-12, atol: float = 1e-12) -> tuple[torch.Tensor, int]:
    """Integrate ``dx/dsigma = (x - D)/sigma`` from ``sigma_from`` to ``sigma_to`` with scipy's DOP853 in the
    variable ``u = log(sigma)`` (smooth across scales), float64. Returns ``(x, number of evaluations)``."""
    from scipy.integrate import solve_ivp

    shape = x.shape
    nfev = 0

    def f(u, y):
        nonlocal nfev
        nfev += 1
        s = math.exp(u)
        xt = torch.from_numpy(y).reshape(shape)
        d = (xt - denoiser(xt, torch.full((shape[0],), s, dtype=torch.float64), cond)) / s
        return (d * s).reshape(-1).numpy()  # dx/du = sigma * dx/dsigma

    sol = solve_ivp(f, (math.log(sigma_from), math.log(sigma_to)), x.reshape(-1).double().numpy(),
                    method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"reference ODE solve failed: {sol.message}")
    return torch.from_numpy(np.ascontiguousarray(sol.y[:, -1])).reshape(shape), nfev
