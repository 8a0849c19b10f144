"""Shared pieces of the image scorers: input checks, batching, tensor -> PIL, safe checkpoint loading.

Every image scorer takes ``images`` as a float tensor ``(B, 3, H, W)`` in ``[0, 1]`` (or a list of ``(3, H, W)``
tensors of varying size) and a list of ``B`` prompts, and returns a ``(B,)`` float64 tensor on the CPU.

Images are quantised to 8 bit before preprocessing (``round(255 x)``), exactly what the reference scorers see
when they read the PNG files that sampling writes; the reference packages' PIL-based preprocessing then runs
unchanged, which is what makes per-image parity with them possible.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import EPDError

__all__ = ["ImageScorer", "to_pil", "as_image_list", "load_checkpoint", "check_state_dict", "WrongWeightsError"]


class WrongWeightsError(EPDError):
    """A weights file exists but does not hold the expected model."""


def as_image_list(images) -> list[torch.Tensor]:
    """Validate scorer input and return a list of ``(3, H, W)`` float tensors in ``[0, 1]``.

    Args:
        images: ``(B, 3, H, W)`` or ``(B, 1, H, W)`` tensor, or a list of ``(C, H, W)`` tensors; one channel is
            replicated to three (grayscale).

    Returns:
        `list[torch.Tensor]`: one ``(3, H, W)`` tensor per image.
    """
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise EPDError(f"images: expected a (B, 3, H, W) tensor, got shape {tuple(images.shape)}")
        items = list(images)
    elif isinstance(images, (list, tuple)):
        items = list(images)
    else:
        raise EPDError(f"images: expected a tensor or a list of tensors, got {type(images).__name__}")
    out = []
    for i, x in enumerate(items):
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[0] not in (1, 3):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise EPDError(f"images[{i}]: expected a (3, H, W) tensor, got {shape}")
        if not x.is_floating_point():
            raise EPDError(f"images[{i}]: expected a float tensor in [0, 1], got dtype {x.dtype}")
        if not torch.isfinite(x).all():
            raise EPDError(f"images[{i}]: contains NaN or inf")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise EPDError(f"images[{i}]: values must lie in [0, 1], got [{lo:.3f}, {hi:.3f}]"
                           + (" (images in [-1, 1]? map them with (x + 1) / 2)" if lo < -0.1 else ""))
        out.append(x.expand(3, -1, -1) if x.shape[0] == 1 else x)
    return out


def to_pil(x: torch.Tensor):
    """``(3, H, W)`` float in ``[0, 1]`` -> 8-bit RGB ``PIL.Image`` (``round(255 x)``, clamped)."""
    from PIL import Image

    arr = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(arr))  # (H, W, 3) uint8 -> RGB


def load_checkpoint(path: str | os.PathLike, what: str):
    """``torch.load`` with ``weights_only=True`` (no code execution); errors name the file.

    Args:
        path: checkpoint file.
        what (`str`): human description for the error message.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle of a whole model, not a torch file, ...
        raise WrongWeightsError(
            f"{path}: cannot read as a {what} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "expected a torch state_dict file (a whole pickled model is refused: save its state_dict instead)"
        ) from None


def check_state_dict(module: torch.nn.Module, sd: dict, path, what: str, ignore=("position_ids",),
                     optional_prefixes: tuple[str, ...] = ()) -> None:
    """Load ``sd`` into ``module`` strictly, turning key/shape mismatches into one clear error.

    Keys whose last component is in ``ignore`` (buffers that older library versions saved) may be absent or extra;
    module keys starting with one of ``optional_prefixes`` (parts unused for scoring) may be absent.

    Args:
        module: target module.
        sd (`dict`): state dict read from ``path``.
        path: file it came from (for the message).
        what (`str`): expected model, e.g. ``"HPSv2.1 open_clip ViT-H-14"``.
    """
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WrongWeightsError(f"{path}: not a {what} state_dict (got {type(sd).__name__})")
    own = module.state_dict()
    skip = lambda k: k.rsplit(".", 1)[-1] in ignore  # noqa: E731
    missing = [k for k in own if k not in sd and not skip(k) and not k.startswith(tuple(optional_prefixes))]
    unexpected = [k for k in sd if k not in own and not skip(k)]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:2]})")
        raise WrongWeightsError(f"{path}: does not hold a {what} checkpoint: " + "; ".join(parts))
    module.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)


class ImageScorer:
    """Base class: batching, input validation and float64 output around ``_score_batch``.

    Subclasses set ``name``/``higher_is_better`` and implement ``_score_batch(pil_images, prompts) -> Tensor``.

    Args:
        batch_size (`int`): images per forward pass.
        device (`str`): torch device of the model.
    """

    name: str = "scorer"
    higher_is_better: bool = True
    kind: str = "image"

    def __init__(self, batch_size: int = 8, device: str = "cpu"):
        if int(batch_size) < 1:
            raise EPDError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.weights: dict[str, str] = {}

    def _score_batch(self, pil_images: list, prompts: list[str]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, images, prompts: Sequence[str]) -> torch.Tensor:
        """Score images against prompts.

        Args:
            images: ``(B, 3, H, W)`` float tensor in ``[0, 1]`` (or a list of ``(3, H, W)`` tensors).
            prompts (`list[str]`): one prompt per image.

        Returns:
            `torch.Tensor`: ``(B,)`` float64 scores on the CPU.
        """
        imgs = as_image_list(images)
        if isinstance(prompts, str):
            raise EPDError("prompts: expected a list of strings, got one string")
        prompts = list(prompts)
        if len(prompts) != len(imgs):
            raise EPDError(f"{self.name}: {len(imgs)} images but {len(prompts)} prompts")
        if not all(isinstance(p, str) for p in prompts):
            raise EPDError(f"{self.name}: prompts must be strings")
        out = []
        for i in range(0, len(imgs), self.batch_size):
            pil = [to_pil(x) for x in imgs[i:i + self.batch_size]]
            out.append(self._score_batch(pil, prompts[i:i + self.batch_size]).detach().reshape(-1).cpu().double())
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={str(self.device)!r})"
