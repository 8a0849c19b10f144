"""The independent digits classifier behind the digits metrics and rewards.

An MLP on the flattened 8×8 image (a different architecture and seed from the conv U-Net denoiser), trained on the
train split only. It provides

* class log-probabilities (``digits_alignment``, ``digits_accuracy``: our CLIP-score analogue),
* penultimate-layer features for the Fréchet distance (``digits_fd``: our FID analogue), computed with an
  eigenvalue-based matrix square root (:func:`fd_from_stats`),
* a class-conditional Gaussian of train-split features (pooled, shrunk covariance) for ``digits_realism``.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import ConfigError, EPDError
from ...progress import Heartbeat
from .data import NUM_CLASSES, DigitsSplit, to_base_resolution
from .model import load_safetensors_checked, read_meta, save_model

__all__ = ["DigitsClassifierConfig", "DigitsClassifier", "train_classifier", "save_classifier", "load_classifier",
           "frechet_distance", "fd_from_stats", "feature_stats", "sqrtm_psd"]

FORMAT = "epd-digits-classifier"


@dataclass
class DigitsClassifierConfig:
    """Training options of the classifier (``backbones.digits.train.classifier`` in the YAML config).

    Args:
        seed (`int`): its own seed (the denoiser uses another).
        hidden (`list[int]`): hidden widths; the last one is the feature dimension for digits-FD.
        dropout (`float`): dropout after each hidden layer.
        steps (`int`): Adam steps on random minibatches of the train split.
        batch_size (`int`), lr (`float`), weight_decay (`float`): optimiser settings.
        noise_std (`float`): Gaussian pixel noise added to training images (in ``[-1, 1]`` units), so generated
            digits with slight artefacts are still read reliably.
        shrinkage (`float`): covariance shrinkage towards a scaled identity for the realism Gaussian.
    """

    seed: int = 1
    hidden: list = field(default_factory=lambda: [256, 64])
    dropout: float = 0.2
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    noise_std: float = 0.1
    shrinkage: float = 0.1

    @classmethod
    def from_dict(cls, d: dict | None, where: str = "classifier") -> "DigitsClassifierConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        for k in d:
            if k not in known:
                raise ConfigError(f"{where}.{k}: unknown key; known: {sorted(known)}")
        return cls(**d)


class DigitsClassifier(nn.Module):
    """MLP ``64 -> hidden... -> 10`` on images at the base 8×8 resolution in ``[-1, 1]``.

    Buffers ``class_means`` ``(10, d)`` and ``precision`` ``(d, d)`` hold the realism Gaussian of train features.
    """

    def __init__(self, hidden=(256, 64), dropout: float = 0.2):
        super().__init__()
        layers, d = [], 64
        for h in hidden:
            layers += [nn.Linear(d, h), nn.GELU(), nn.Dropout(dropout)]
            d = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d, NUM_CLASSES)
        self.feature_dim = d
        self.register_buffer("class_means", torch.zeros(NUM_CLASSES, d))
        self.register_buffer("precision", torch.eye(d))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(B, d)`` of ``(B, 1, 8, 8)`` images in ``[-1, 1]``."""
        return self.body(x.reshape(x.shape[0], -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def read(self, images: torch.Tensor, batch_size: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features, log_probs)`` of images ``(B, C, H, W)`` in ``[0, 1]`` (any H = 8k, grey or RGB)."""
        x = to_base_resolution(images).to(self.class_means.device)
        feats = torch.cat([self.features(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
        return feats, F.log_softmax(self.head(feats), -1)

    def realism(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``-(f - mu_y)^T P (f - mu_y) / d``: higher is closer to the typical real digit of class ``y``."""
        diff = feats - self.class_means[labels]
        return -((diff @ self.precision) * diff).sum(-1) / self.feature_dim


def _split_images_01(x: torch.Tensor) -> torch.Tensor:
    return (x + 1) / 2


@contextlib.contextmanager
def _one_thread():
    """Run a tiny model on one thread: for an MLP this size, thread synchronisation costs more than it saves
    (5x slower with two threads on a shared, busy 2-core machine) and one thread is deterministic everywhere."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def train_classifier(split: DigitsSplit, cfg: DigitsClassifierConfig) -> tuple[DigitsClassifier, dict]:
    """Train the classifier on the train split (deterministic for ``cfg.seed`` on CPU).

    Returns:
        ``(classifier, stats)`` with train/held-out accuracy in ``stats``.
    """
    with _one_thread():
        return _train_classifier(split, cfg)


def _train_classifier(split: DigitsSplit, cfg: DigitsClassifierConfig) -> tuple[DigitsClassifier, dict]:
    torch.manual_seed(cfg.seed)
    clf = DigitsClassifier(cfg.hidden, cfg.dropout)
    x = to_base_resolution(_split_images_01(split.x_train))
    y = split.y_train
    opt = torch.optim.AdamW(clf.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    clf.train()
    beat = Heartbeat("digits classifier", cfg.steps)
    for step in range(cfg.steps):
        beat(step)
        idx = torch.randint(0, len(x), (cfg.batch_size,), generator=g)
        xb = x[idx] + cfg.noise_std * torch.randn(x[idx].shape, generator=g)
        lr = cfg.lr * 0.5 * (1 + np.cos(np.pi * step / cfg.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        loss = F.cross_entropy(clf(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    clf.eval()
    with torch.no_grad():
        feats = clf.features(x)
        means = torch.stack([feats[y == c].mean(0) for c in range(NUM_CLASSES)])
        centred = feats - means[y]
        cov = centred.T @ centred / (len(x) - NUM_CLASSES)
        d = cov.shape[0]
        cov = (1 - cfg.shrinkage) * cov + cfg.shrinkage * cov.trace() / d * torch.eye(d)
        clf.class_means.copy_(means)
        clf.precision.copy_(torch.linalg.inv(cov.double()).float())
        acc_tr = (clf(x).argmax(-1) == y).float().mean().item()
        x_ho = to_base_resolution(_split_images_01(split.x_heldout))
        acc_ho = (clf(x_ho).argmax(-1) == split.y_heldout).float().mean().item()
    return clf, {"train_accuracy": acc_tr, "heldout_accuracy": acc_ho, "final_loss": float(loss.detach())}


def save_classifier(out_dir: str | Path, clf: DigitsClassifier, cfg: DigitsClassifierConfig, extra: dict) -> None:
    """Write ``classifier.safetensors`` + ``classifier.json`` (architecture, config, accuracies)."""
    meta = {"format": FORMAT, "version": 1, "arch": {"hidden": list(cfg.hidden), "dropout": cfg.dropout},
            "train": asdict(cfg), **extra}
    save_model(out_dir, clf, meta, stem="classifier")


def load_classifier(weights_dir: str | Path, device: str = "cpu") -> tuple[DigitsClassifier, dict]:
    """Load ``classifier.safetensors`` + ``classifier.json`` from a backbone training folder (checked)."""
    weights_dir = Path(weights_dir)
    js = weights_dir / "classifier.json"
    meta = read_meta(js, FORMAT)
    try:
        clf = DigitsClassifier(**meta["arch"])
    except TypeError as e:
        raise EPDError(f"{js}: invalid 'arch' ({e})") from None
    load_safetensors_checked(weights_dir / "classifier.safetensors", clf, meta, js)
    return clf.to(device).eval(), meta


# --------------------------------------------------------------------------------------------------------------
# Fréchet distance.

def sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a positive semi-definite matrix via ``eigh`` (negative round-off clipped)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (float64) of features ``(N, d)``."""
    f = np.asarray(feats.detach().cpu() if isinstance(feats, torch.Tensor) else feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise EPDError(f"features: need at least 2 rows of shape (N, d), got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def fd_from_stats(mu1, s1, mu2, s2) -> float:
    """``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)`` with eigenvalue-based square roots
    (well defined for singular covariances, unlike an iterative ``sqrtm``)."""
    r1 = sqrtm_psd(s1)
    cross = np.linalg.eigvalsh((r1 @ s2 @ r1 + (r1 @ s2 @ r1).T) / 2)
    fd = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(cross, 0, None)).sum())
    return max(fd, 0.0)


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between two feature sets ``(N_a, d)`` and ``(N_b, d)``.

    FD is biased upwards by small sample counts: compare values only at equal ``(N_a, N_b)``.
    """
    return fd_from_stats(*feature_stats(feats_a), *feature_stats(feats_b))
