"""Scorer factories of the digits backbone, registered in :mod:`epd.rewards` as ``digits_*``.

All read the independent classifier from ``weights_dir`` (the ``epd backbone train --out`` folder holding
``classifier.safetensors``). Image scorers: ``scorer(images (B, 3, H, W) in [0, 1], prompts) -> (B,) float64``.

* ``digits_alignment`` (:func:`make_alignment`): ``log p(prompted digit | image)``; the teacher is already near 0.
* ``digits_realism`` (:func:`make_realism`): ``-(f - mu_y)^T P (f - mu_y) / d``, the negative Mahalanobis distance
  of the image's classifier features ``f`` to the train-split feature Gaussian of the prompted class (pooled,
  shrunk covariance). Real held-out digits average about ``-1``; it has headroom above what the teacher reaches
  (0 is the class prototype). The held-out split is not used, so it stays an unbiased evaluation reference.
* ``digits_typicality`` (:func:`make_typicality`): ``-|log(m / m_y)|`` with ``m`` the image's Mahalanobis distance
  (as in ``digits_realism``, positive) and ``m_y`` the median of ``m`` over the train-split digits of the prompted
  class. Unlike ``digits_realism`` it does not reward collapsing onto the class prototype: few-step samples sit
  *closer* to their class mean than real digits do (too smooth), and the most realistic distance is the typical
  one. The RDPO reward of the default study.
* ``digits_accuracy`` (:func:`make_accuracy`): 1 if the classifier's top class is the prompted digit, else 0.
* ``digits_fd`` (:func:`make_fd`): a set scorer, ``compute(images_a, images_b)`` -> Fréchet distance of classifier
  features (FD is biased by sample size: compare values at equal counts only).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...errors import EPDError
from .classifier import DigitsClassifier, frechet_distance, load_classifier
from .data import parse_prompts

__all__ = ["make_alignment", "make_realism", "make_typicality", "make_accuracy", "make_fd", "DigitsImageScorer", "DigitsFD"]


def _check_images(images) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise EPDError(f"images: expected a (B, 3, H, W) tensor in [0, 1], got {shape}")
    if not images.is_floating_point() or not torch.isfinite(images).all():
        raise EPDError("images: expected finite float values in [0, 1]")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise EPDError(f"images: values must lie in [0, 1], got [{lo:.3f}, {hi:.3f}]"
                       + (" (images in [-1, 1]? map them with (x + 1) / 2)" if lo < -0.1 else ""))
    return images


def _load(weights_dir, device) -> DigitsClassifier:
    return _load_with_meta(weights_dir, device)[0]


def _load_with_meta(weights_dir, device) -> tuple[DigitsClassifier, dict]:
    if weights_dir is None:
        raise EPDError("digits scorers need weights_dir, the `epd backbone train --out DIR` folder that holds "
                       "classifier.safetensors (on the command line: `epd evaluate --weights-dir DIR`, "
                       "`epd rdpo --weights DIR`)")
    return load_classifier(Path(weights_dir), device)


class DigitsImageScorer:
    """Per-image scorer over the digits classifier.

    Args:
        clf (:class:`DigitsClassifier`): the loaded classifier.
        name (`str`): registry name.
        kind (`str`): ``"alignment"``, ``"realism"`` or ``"accuracy"``.
    """

    higher_is_better = True

    def __init__(self, clf: DigitsClassifier, name: str, kind: str, split_seed: int = 0):
        if kind not in ("alignment", "realism", "accuracy", "typicality"):
            raise ValueError(f"kind: {kind!r}")
        self.clf, self.name, self.kind = clf, name, kind
        self.typical = typical_distances(clf, split_seed) if kind == "typicality" else None

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        images = _check_images(images)
        labels = parse_prompts(prompts)
        if len(labels) != len(images):
            raise EPDError(f"prompts: got {len(labels)} prompts for {len(images)} images")
        feats, logp = self.clf.read(images)
        labels = labels.to(feats.device)
        if self.kind == "alignment":
            out = logp.gather(1, labels[:, None])[:, 0]
        elif self.kind == "accuracy":
            out = (logp.argmax(-1) == labels).float()
        elif self.kind == "realism":
            out = self.clf.realism(feats, labels)
        else:
            m = (-self.clf.realism(feats, labels)).clamp_min(1e-8)
            out = -(m / self.typical.to(m.device)[labels]).log().abs()
        return out.double().cpu()


def typical_distances(clf: DigitsClassifier, split_seed: int = 0) -> torch.Tensor:
    """Per class, the median Mahalanobis distance (``-realism``) of the train-split digits: ``(10,)``."""
    from .data import NUM_CLASSES, load_split

    split = load_split(seed=split_seed)
    feats, _ = clf.read(((split.x_train + 1) / 2).clamp(0, 1))
    labels = split.y_train.to(feats.device)
    m = -clf.realism(feats, labels)
    return torch.stack([m[labels == c].median() for c in range(NUM_CLASSES)]).detach()


class DigitsFD:
    """Set scorer: Fréchet distance between the classifier features of two image sets.

    Args:
        clf (:class:`DigitsClassifier`): the loaded classifier.
    """

    name = "digits_fd"
    higher_is_better = False
    kind = "set"
    backbone = "digits"  # its built-in reference: this backbone kind's heldout_reference (no --fid-ref given)

    def __init__(self, clf: DigitsClassifier):
        self.clf = clf

    def features(self, images: torch.Tensor) -> np.ndarray:
        """Classifier features ``(N, d)`` (float64) of images ``(N, 3, H, W)`` in ``[0, 1]``."""
        return self.clf.read(_check_images(images))[0].double().cpu().numpy()

    def compute(self, images_a: torch.Tensor, images_b: torch.Tensor) -> float:
        """FD between the two sets (either may also be a precomputed ``(N, d)`` feature array)."""
        fa = images_a if _is_features(images_a) else self.features(images_a)
        fb = images_b if _is_features(images_b) else self.features(images_b)
        return frechet_distance(fa, fb)


def _is_features(x) -> bool:
    return (isinstance(x, np.ndarray) or isinstance(x, torch.Tensor)) and x.ndim == 2


def make_alignment(weights_dir=None, device: str = "cpu", **kw) -> DigitsImageScorer:
    """``digits_alignment``: log-probability of the prompted digit under the classifier."""
    return DigitsImageScorer(_load(weights_dir, device), "digits_alignment", "alignment")


def make_realism(weights_dir=None, device: str = "cpu", **kw) -> DigitsImageScorer:
    """``digits_realism``: negative Mahalanobis distance to the prompted class's feature Gaussian (per dimension)."""
    return DigitsImageScorer(_load(weights_dir, device), "digits_realism", "realism")


def make_typicality(weights_dir=None, device: str = "cpu", **kw) -> DigitsImageScorer:
    """``digits_typicality``: ``-|log(m / m_y)|``, how typical the image's distance to its class Gaussian is."""
    clf, meta = _load_with_meta(weights_dir, device)
    return DigitsImageScorer(clf, "digits_typicality", "typicality", int((meta.get("data") or {}).get("split_seed", 0)))


def make_accuracy(weights_dir=None, device: str = "cpu", **kw) -> DigitsImageScorer:
    """``digits_accuracy``: 1 if the classifier reads the prompted digit, else 0."""
    return DigitsImageScorer(_load(weights_dir, device), "digits_accuracy", "accuracy")


def make_fd(weights_dir=None, device: str = "cpu", **kw) -> DigitsFD:
    """``digits_fd``: set scorer with ``compute(images_a, images_b)`` -> Fréchet distance of classifier features."""
    return DigitsFD(_load(weights_dir, device))
