"""Reading sample directories: image files, their sidecar JSONs, and prompt pairing.

``epd sample`` writes ``NAME.png`` with a sidecar ``NAME.json`` (``prompt``, ``seed``, ``solver``, ``nfe``,
``forward_passes``, ...). Images are paired with prompts **through the sidecar**, never by sorted position (the
original scorers paired by sort order, which silently misaligned when stray files appeared).

Rules:

* Files and folders whose name starts with ``.`` are skipped (``.ipynb_checkpoints``, editor temp files), and so
  is the contact sheet ``grid.png`` that ``epd sample --grid`` writes at the top of its folder (when it has no
  sidecar of its own).
* Image suffixes: ``.png``, ``.jpg``, ``.jpeg``, ``.webp``, ``.bmp`` (case-insensitive); other files are ignored.
* Mode conversion (what the original scorers' ``Image.open(p).convert("RGB")`` did): grayscale (``1``, ``L``,
  ``LA``) is replicated to three channels, palette images (``P``, ``PA``) are expanded, and an alpha channel
  (``RGBA``, ``LA``, ``PA``) is **dropped**, not composited. 16-bit and float images (``I``, ``I;16``, ``F``)
  are refused: save 8-bit images.
* A corrupt or truncated image is an error naming the file.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import EPDError

__all__ = ["IMAGE_SUFFIXES", "CONVERTIBLE_MODES", "iter_image_files", "load_image", "Sample", "pair_samples",
           "check_prompts"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CONVERTIBLE_MODES = ("RGB", "RGBA", "RGBX", "L", "LA", "1", "P", "PA")


def iter_image_files(root: str | os.PathLike) -> list[Path]:
    """All image files under ``root`` (recursive), skipping hidden files and folders; sorted for determinism."""
    root = Path(root)
    if not root.is_dir():
        raise EPDError(f"images directory {root}: not found (or not a directory)")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES):
                out.append(Path(dirpath) / f)
    return sorted(out)


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image file to a ``(3, H, W)`` float tensor in ``[0, 1]`` (``uint8 / 255``).

    Args:
        path: image file.

    Returns:
        `torch.Tensor`: RGB image (see the module docstring for the mode conversion rule).
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode not in CONVERTIBLE_MODES:
                raise EPDError(f"image {path}: mode {mode!r} is not supported (16-bit/float/CMYK); "
                               "save it as 8-bit RGB or grayscale")
            rgb = im.convert("RGB") if mode != "RGB" else im.copy()
    except EPDError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise EPDError(f"image {path}: cannot be decoded ({type(e).__name__}: {e}); the file is corrupt or "
                       "truncated — regenerate or remove it") from None
    arr = np.array(rgb, dtype=np.uint8)
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


@dataclass
class Sample:
    """One image with its sidecar metadata."""

    path: Path
    rel: str
    prompt: str
    seed: int | None
    meta: dict = field(default_factory=dict)


def _read_sidecar(img: Path) -> dict:
    side = img.with_suffix(".json")
    if not side.is_file():
        raise EPDError(f"image {img}: no sidecar {side.name}; `epd evaluate` pairs images with prompts through the "
                       f"sidecar JSON that `epd sample` writes (it never pairs by file order): {HOW_TO_SAMPLE}")
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EPDError(f"sidecar {side}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("prompt"), str):
        raise EPDError(f"sidecar {side}: needs a string field 'prompt'")
    seed = meta.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise EPDError(f"sidecar {side}: 'seed' must be an integer, got {seed!r}")
    return meta


GRID_NAME = "grid.png"  # the contact sheet of `epd sample --grid`
HOW_TO_SAMPLE = ("`epd sample --config CONFIG --backbone NAME --solver SOLVER --nfe NFE --seeds 0-99 --out DIR` "
                 "writes one PNG and one sidecar JSON (seed, prompt, solver, NFE) per seed; evaluate DIR")


def pair_samples(root: str | os.PathLike) -> list[Sample]:
    """Pair every image under ``root`` with its sidecar's prompt and seed (skipping the ``--grid`` contact sheet).

    Raises:
        EPDError: empty directory, missing or malformed sidecar.
    """
    root = Path(root)
    grid = root / GRID_NAME
    files = [f for f in iter_image_files(root) if f != grid or f.with_suffix(".json").is_file()]
    if not files:
        raise EPDError(f"images directory {root}: contains no images ({', '.join(IMAGE_SUFFIXES)}; hidden folders "
                       "such as .ipynb_checkpoints are skipped)")
    out = []
    for f in files:
        meta = _read_sidecar(f)
        out.append(Sample(f, f.relative_to(root).as_posix(), meta["prompt"], meta.get("seed"), meta))
    return out


def check_prompts(samples: list[Sample], prompts: list[str], prompts_file: str = "--prompts") -> int:
    """Check that the images cover the prompt list exactly ``k`` times each (``k`` images per prompt).

    Args:
        samples: paired samples.
        prompts: prompts read from the prompt file (duplicates count).
        prompts_file: name for messages.

    Returns:
        `int`: ``k``, images per prompt.
    """
    have, want = Counter(s.prompt.strip() for s in samples), Counter(p.strip() for p in prompts)
    unknown = [p for p in have if p not in want]
    if unknown:
        ex = next(s.rel for s in samples if s.prompt.strip() == unknown[0])
        raise EPDError(f"{len(unknown)} image prompt(s) are not in {prompts_file}, e.g. {unknown[0]!r} (image {ex}); "
                       "the images were generated from another prompt list")
    missing = [p for p in want if p not in have]
    if missing:
        raise EPDError(f"{len(missing)} prompt(s) of {prompts_file} have no image, e.g. {missing[0]!r}; "
                       f"found {len(samples)} images for {len(prompts)} prompts")
    k = len(samples) // len(prompts)
    bad = [p for p in want if have[p] != k * want[p]]
    if len(samples) % len(prompts) or bad:
        p = bad[0] if bad else next(iter(want))
        raise EPDError(f"image/prompt count mismatch: {len(samples)} images for {len(prompts)} prompts in "
                       f"{prompts_file} (prompt {p!r} has {have[p]} images, expected {max(k, 1) * want[p]})")
    return k
