"""The digits backbone: the :class:`~epd.backbones.base.Denoiser` adapter (CFG inside, K stacked points) and the
:class:`~epd.backbones.base.Backbone` (prompts → labels, seeded noise, EDM sigma grids, images)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ...errors import ConfigError, EPDError
from ..adapter import BackboneAdapter
from .data import NULL_CLASS, check_labels, heldout_images, parse_prompts, to_base_resolution
from .model import EDMPrecond, load_model

__all__ = ["DigitsDenoiser", "DigitsBackbone", "edm_sigmas"]


class DigitsDenoiser:
    """``D(x, sigma, labels) -> x0_hat`` with classifier-free guidance inside.

    ``D = D_uncond + w (D_cond - D_uncond)``; ``w = 1`` is the conditional model alone (one pass), ``w = 0`` the
    unconditional one. Otherwise both branches run in one doubled batch (``passes_per_eval = 2``).

    Args:
        net (:class:`EDMPrecond`): the trained network (used in eval mode, parameters frozen).
        guidance (`float`): CFG scale ``w``.
    """

    coords = "edm"
    sigma_min = 0.002
    sigma_max = 80.0

    def __init__(self, net: EDMPrecond, guidance: float = 1.0):
        self.net = net.eval().requires_grad_(False)
        self.guidance = float(guidance)
        if not math.isfinite(self.guidance):
            raise ConfigError(f"guidance: expected a finite number, got {guidance!r}")

    @property
    def passes_per_eval(self) -> int:
        return 1 if self.guidance in (0.0, 1.0) else 2

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        m = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        sigma = sigma.expand(m) if sigma.dim() == 0 else sigma.reshape(m)
        xf = x.float()
        null = torch.full((m,), NULL_CLASS, dtype=torch.long, device=x.device)
        if cond is None or self.guidance == 0.0:
            out = self.net(xf, sigma, null)
        else:
            labels = check_labels(cond.tensors["labels"] if hasattr(cond, "tensors") else cond, "cond")
            if m % labels.shape[0]:
                raise EPDError(f"cond: {labels.shape[0]} labels do not divide a batch of {m} states")
            labels = labels.to(x.device).repeat(m // labels.shape[0])
            if self.guidance == 1.0:
                out = self.net(xf, sigma, labels)
            else:
                both = self.net(torch.cat([xf, xf]), torch.cat([sigma, sigma]), torch.cat([labels, null]))
                d_cond, d_uncond = both.chunk(2)
                out = d_uncond + self.guidance * (d_cond - d_uncond)
        return out.to(x.dtype)


def edm_sigmas(num_points: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) polynomial grid of ``num_points`` noise levels from ``sigma_max`` down to ``sigma_min``
    (float64, no final 0)."""
    if num_points < 2:
        raise ConfigError(f"num_points: a grid needs at least 2 points, got {num_points}")
    i = torch.arange(num_points, dtype=torch.float64) / (num_points - 1)
    return (sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


class DigitsBackbone(BackboneAdapter):
    """The embedded digits backbone (:class:`~epd.backbones.base.Backbone` protocol).

    Capabilities (:mod:`epd.backbones.adapter`): ``trainable`` (``epd backbone train`` writes its folder),
    ``weights_folder`` (stages read that folder; the digits metrics' classifier lives there too),
    :meth:`metric_features` and :meth:`heldout_reference`.

    Args:
        net (:class:`EDMPrecond`): the trained network.
        meta (`dict`): the ``model.json`` content (architecture, data split, training config).
        guidance (`float`): classifier-free guidance scale.
    """

    name = "digits"
    trainable = True
    weights_folder = True
    coords = "edm"
    sigma_min = 0.002
    sigma_max = 80.0
    default_schedule = "edm"
    graph_safe = False  # each call validates its labels on the host: `epd sample` leaves CUDA graphs off (auto)

    def __init__(self, net: EDMPrecond, meta: dict | None = None, guidance: float = 1.0):
        self.meta = meta or {}
        self.denoiser = DigitsDenoiser(net, guidance)
        self.resolution = net.net.resolution
        self.device = next(net.parameters()).device

    @classmethod
    def load(cls, weights_dir: str | Path, guidance: float = 1.0, device: str = "cpu") -> "DigitsBackbone":
        """Load ``model.safetensors`` + ``model.json`` from a training output folder."""
        net, meta = load_model(weights_dir, device=device)
        return cls(net, meta, guidance)

    @classmethod
    def from_section(cls, section: dict, device: str = "cpu", weights_dir=None, **_) -> "DigitsBackbone":
        """The trained model of ``weights_dir`` (else ``section["weights"]``) with ``section["guidance"]``."""
        wdir = weights_dir or section.get("weights")
        if not wdir:
            raise ConfigError("backbone digits: no trained model folder given (--weights DIR, the output of "
                              "`epd backbone train`, or backbones.<name>.weights in the config)")
        return cls.load(wdir, guidance=float(section.get("guidance", 1.0)), device=device)

    @classmethod
    def metric_features(cls, weights_dir, device: str = "cpu"):
        """The differentiable feature map of digits-FD, for ``distill.feature_weight``: the classifier's penultimate
        features of the decoded final state (``x`` in ``[-1, 1]``)."""
        from .classifier import load_classifier

        if weights_dir is None:
            raise ConfigError("distill.feature_weight: needs --weights (the folder holding classifier.safetensors)")
        clf = load_classifier(weights_dir, device)[0].eval()
        for p in clf.parameters():
            p.requires_grad_(False)

        def features(x: torch.Tensor) -> torch.Tensor:
            return clf.features(to_base_resolution(((x.float() + 1) / 2).clamp(0, 1)))

        return features

    @classmethod
    def heldout_reference(cls, weights_dir) -> torch.Tensor:
        """Held-out real digits ``(B, 3, H, W)`` in ``[0, 1]`` of the split recorded in ``<weights_dir>/model.json``:
        the reference set of digits-FD."""
        return heldout_images(weights_dir)

    @property
    def guidance(self) -> float:
        return self.denoiser.guidance

    def prepare(self, prompts: list[str]) -> torch.Tensor:
        """Labels ``(B,)`` for text prompts (unknown prompts raise :class:`EPDError` listing accepted forms)."""
        return parse_prompts(prompts).to(self.device)

    def noise(self, seeds: list[int], sigma: float | None = None) -> torch.Tensor:
        """``randn(1, H, W) * sigma`` (default ``sigma_max``) from ``torch.Generator().manual_seed(seed)`` per seed
        (CPU)."""
        shape = (1, self.resolution, self.resolution)
        z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        return z.to(self.device) * (self.sigma_max if sigma is None else float(sigma))

    def sigmas(self, num_points: int, schedule: str | None = None, rho: float | None = None, **kw) -> torch.Tensor:
        """The EDM polynomial grid (``schedule="edm"``, ``rho=7``) from ``sigma_max`` to ``sigma_min``; other names
        (``logsnr``, ``time_uniform``) come from :func:`epd.schedules.get_schedule`."""
        schedule = schedule or self.default_schedule
        s_min = float(kw.pop("sigma_min", self.sigma_min))
        s_max = float(kw.pop("sigma_max", self.sigma_max))
        if kw:
            raise ConfigError(f"sigmas: unknown option(s) {sorted(kw)}")
        if schedule in ("edm", "polynomial"):
            return edm_sigmas(num_points, s_min, s_max, 7.0 if rho is None else float(rho))
        try:
            from ...schedules import get_schedule
        except ImportError:
            raise ConfigError(f"schedule: {schedule!r} is not available for the digits backbone; use 'edm'") from None
        return get_schedule(schedule, num_points, sigma_min=s_min, sigma_max=s_max, rho=rho)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in ``[0, 1]`` (grey replicated), clamped."""
        return ((x.float() + 1) / 2).clamp(0, 1).expand(-1, 3, -1, -1).contiguous()

