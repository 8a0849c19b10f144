"""Fréchet Inception Distance: statistics, a stable Fréchet distance, and the clean-fid protocol.

Protocol ``fid_clean`` (clean-fid ``mode="clean"``, Parmar et al. 2022):

1. each 8-bit RGB image is resized to 299x299 **per channel in float** with PIL bicubic (anti-aliased), clipped to
   ``[0, 255]`` and not re-quantised;
2. FID Inception-v3 (TF 2015-12-05 weights; here the pytorch-fid port ``pt_inception-2015-12-05.pth``) with the TF
   graph's input scaling ``(x - 128) / 128``; 2048-d pool3 features;
3. ``mu``, ``sigma`` (``np.cov``, ddof 1) per set and the Fréchet distance between the two Gaussians.

clean-fid itself runs NVIDIA's TorchScript export of the same TF graph; the pytorch-fid port matches it up to
float rounding of the port (not verifiable here without both weight files). Numbers from other protocols
(pytorch-fid's bilinear resize, EDM's detector at native resolution, torchmetrics) differ by up to several points
at low resolution and must never share a column with these.
"""

from __future__ import annotations

import os
import numpy as np
import torch

from ..errors import EPDError

__all__ = ["frechet_distance", "feature_stats", "clean_resize", "FIDScorer", "make_fid_clean", "save_stats",
           "load_stats"]


def _clip_eig(w: np.ndarray) -> np.ndarray:
    # eigenvalues below the rounding level of the largest one are zero (singular covariances), not sqrt(noise)
    tol = max(float(w.max()), 0.0) * w.size * np.finfo(np.float64).eps
    return np.where(w > tol, w, 0.0)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(_clip_eig(w))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)``, with both square roots from symmetric
    eigendecompositions (eigenvalues at the rounding level set to 0), so singular covariances (fewer samples
    than dimensions) give a finite, non-negative result without the complex-part fix-ups of ``scipy.linalg.sqrtm``.

    Args:
        mu1, mu2: ``(D,)`` means. sigma1, sigma2: ``(D, D)`` covariances.

    Returns:
        `float`: the distance (clipped at 0).
    """
    mu1, mu2 = np.asarray(mu1, np.float64).reshape(-1), np.asarray(mu2, np.float64).reshape(-1)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"frechet_distance: shape mismatch mu {mu1.shape}/{mu2.shape}, sigma {s1.shape}/{s2.shape}")
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    tr_covmean = np.sqrt(_clip_eig(np.linalg.eigvalsh((m + m.T) / 2))).sum()
    d = mu1 - mu2
    return float(max(d @ d + np.trace(s1) + np.trace(s2) - 2 * tr_covmean, 0.0))


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` of ``(N, D)`` features (``np.cov`` with ddof 1, as clean-fid and pytorch-fid)."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise EPDError(f"FID needs at least 2 images per set, got features of shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def clean_resize(img_u8: np.ndarray, size: int = 299) -> np.ndarray:
    """clean-fid ``clean`` resize: per-channel float PIL bicubic to ``size x size``, clipped to ``[0, 255]``.

    Args:
        img_u8 (`np.ndarray`): ``(H, W, 3)`` uint8.

    Returns:
        `np.ndarray`: ``(size, size, 3)`` float32 in ``[0, 255]`` (not re-quantised).
    """
    from PIL import Image

    if img_u8.dtype != np.uint8 or img_u8.ndim != 3 or img_u8.shape[2] != 3:
        raise ValueError(f"clean_resize expects (H, W, 3) uint8, got {img_u8.shape} {img_u8.dtype}")
    chans = []
    for c in range(3):
        im = Image.fromarray(np.ascontiguousarray(img_u8[:, :, c].astype(np.float32)))
        assert im.mode == "F"
        chans.append(np.asarray(im.resize((size, size), resample=Image.BICUBIC)).clip(0, 255))
    return np.stack(chans, axis=2).astype(np.float32)


def save_stats(path, mu, sigma, n: int, protocol: str = "clean") -> None:
    """Write ``mu``/``sigma`` as an ``.npz`` (keys ``mu``, ``sigma``, ``n``, ``protocol``), atomically."""
    from ..io import atomic_path

    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, n=n, protocol=protocol)


def load_stats(path, protocol: str = "clean") -> tuple[np.ndarray, np.ndarray, int | None]:
    """Read ``mu``/``sigma`` from an ``.npz`` (ours, clean-fid's or pytorch-fid's key names)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            mu, sigma = z["mu"], z["sigma"]
            n = int(z["n"]) if "n" in z.files else None
            stored = str(z["protocol"]) if "protocol" in z.files else None
    except (OSError, KeyError, ValueError) as e:
        raise EPDError(f"FID reference {path}: not a statistics .npz with 'mu' and 'sigma' ({e})") from None
    if stored is not None and stored != protocol:
        raise EPDError(f"FID reference {path}: computed with protocol {stored!r}, not {protocol!r}; "
                       "never compare FIDs across protocols")
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise EPDError(f"FID reference {path}: mu {mu.shape} / sigma {sigma.shape} are not a Gaussian's statistics")
    return mu, sigma, n


class FIDScorer:
    """A "set" scorer: FID between two image sets under the clean-fid protocol.

    Args:
        inception (:class:`~epd.metrics.inception.FIDInceptionV3`): network with weights.
        batch_size (`int`): images per forward pass.
        device (`str`): torch device.
    """

    kind = "set"
    name = "fid_clean"
    protocol = "clean"
    higher_is_better = False

    def __init__(self, inception, batch_size: int = 32, device: str = "cpu"):
        self.device = torch.device(device)
        self.net = inception.eval().to(self.device)
        self.batch_size = int(batch_size)
        self.weights: dict[str, str] = {}

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        from ..rewards.base import as_image_list

        (x,) = as_image_list([x])
        u8 = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return torch.from_numpy(clean_resize(u8)).permute(2, 0, 1)

    @torch.no_grad()
    def features(self, images) -> np.ndarray:
        """Pool3 features of images: a ``(B, 3, H, W)`` tensor in ``[0, 1]``, a list of ``(3, H, W)`` tensors, an
        iterable of such batches, or a directory of image files."""
        if isinstance(images, (str, os.PathLike)):
            from .imagedir import iter_image_files, load_image

            files = iter_image_files(images)
            if not files:
                raise EPDError(f"FID: no images in {images}")
            images = (load_image(f) for f in files)
        elif isinstance(images, torch.Tensor):
            images = list(images) if images.ndim == 4 else [images]
        feats, buf = [], []

        def flush():
            x = torch.stack(buf).to(self.device)
            feats.append(self.net.features((x - 128) / 128).double().cpu().numpy())
            buf.clear()

        for item in images:
            items = item if isinstance(item, (list, tuple)) or (isinstance(item, torch.Tensor) and item.ndim == 4) \
                else [item]
            for x in items:
                buf.append(self._prep(x))
                if len(buf) == self.batch_size:
                    flush()
        if buf:
            flush()
        if not feats:
            raise EPDError("FID: no images given")
        return np.concatenate(feats)

    def stats(self, source) -> tuple[np.ndarray, np.ndarray, int]:
        """``(mu, sigma, n)`` of a source: images (see :meth:`features`), an ``(N, 2048)`` feature array, an
        ``.npz`` file or a ``(mu, sigma)`` tuple."""
        if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], np.ndarray):
            return source[0], source[1], None
        if isinstance(source, np.ndarray) and source.ndim == 2:
            mu, sigma = feature_stats(source)
            return mu, sigma, source.shape[0]
        if isinstance(source, (str, os.PathLike)) and str(source).endswith(".npz"):
            return load_stats(source, self.protocol)
        f = self.features(source)
        mu, sigma = feature_stats(f)
        return mu, sigma, f.shape[0]

    def compute(self, images_a, reference) -> float:
        """FID between ``images_a`` and ``reference`` (images, a directory, features, or ``.npz`` statistics)."""
        mu1, s1, _ = self.stats(images_a)
        mu2, s2, _ = self.stats(reference)
        if mu1.shape != mu2.shape:
            raise EPDError(f"FID: feature sizes differ ({mu1.shape[0]} vs {mu2.shape[0]}); the reference statistics "
                           "come from another network")
        return frechet_distance(mu1, s1, mu2, s2)


def make_fid_clean(weights_dir=None, device="cpu", paths=None, batch_size: int = 32) -> FIDScorer:
    """Build the clean-fid-protocol FID scorer from ``data/weights/fid/pt_inception-2015-12-05.pth``.

    Args:
        weights_dir (`str`, *optional*): weights root tried first.
        device (`str`): torch device.
        paths (`dict`, *optional*): ``{"inception": path}``.
        batch_size (`int`): images per forward pass.
    """
    from ..rewards import resolve_weights
    from ..rewards.base import check_state_dict, load_checkpoint
    from .inception import FIDInceptionV3

    path = resolve_weights("fid_clean", weights_dir, paths)["inception"]
    sd = load_checkpoint(path, "FID Inception-v3 state_dict")
    net = FIDInceptionV3()
    check_state_dict(net.net, sd, path, "FID Inception-v3 (pytorch-fid pt_inception-2015-12-05)",
                     ignore=("num_batches_tracked",))
    scorer = FIDScorer(net, batch_size, device)
    scorer.weights = {"inception": str(path)}
    return scorer

