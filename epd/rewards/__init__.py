"""One registry of lazy scorer factories, shared by RDPO rewards and evaluation.

A factory is named as ``"module:function"`` and imported only when :func:`get_scorer` asks for it, so listing
scorers or checking weights never imports open_clip, transformers or ImageReward.

Image scorers: ``scorer(images, prompts) -> (B,) float64`` with ``images`` a ``(B, 3, H, W)`` float tensor in
``[0, 1]``; attributes ``name`` and ``higher_is_better``. Set scorers (FID-like): ``scorer.compute(images_a,
reference) -> float``.

Example:
    >>> from epd.rewards import get_scorer, required_weights
    >>> required_weights("aesthetic")
    [('scorer', 'clip_l14'), ('scorer', 'aesthetic')]
    >>> scorer = get_scorer("hps", device="cuda")            # doctest: +SKIP
    >>> scores = scorer(images, prompts)                      # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EPDError

__all__ = ["register", "get_scorer", "list_scorers", "required_weights", "required_folder", "resolve_weights",
           "ScorerEntry",
           "IMAGEREWARD_RLEPD_OFFSET"]

# The original RLEPD ImageReward scorer added 3 standard deviations of the official normalisation.
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_RLEPD_OFFSET = 3 * IMAGEREWARD_STD


@dataclass(frozen=True)
class ScorerEntry:
    name: str
    factory: str
    description: str
    kind: str = "image"
    weights: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    defaults: tuple[tuple[str, object], ...] = field(default_factory=tuple)
    folder: str = ""


_REGISTRY: dict[str, ScorerEntry] = {}


def register(name: str, factory: str, description: str, kind: str = "image",
             weights: list[tuple[str, str]] | tuple = (), folder: str = "", **defaults) -> None:
    """Register a scorer factory.

    Args:
        name (`str`): registry name (e.g. ``"hps"``).
        factory (`str`): ``"package.module:function"``; called as ``function(weights_dir=None, device="cpu", **kw)``.
        description (`str`): one line for ``epd metrics list``.
        kind (`str`): ``"image"`` (per-image scores) or ``"set"`` (a distance between image sets, e.g. FID).
        weights (`list[tuple[str, str]]`): ``(kind, name)`` weight specs of :mod:`epd.backbones.weights` the
            factory needs, so callers can check every file before loading anything.
        folder (`str`): what ``weights_dir`` must be when the scorer reads a whole folder instead (e.g. a trained
            backbone's); empty when it does not. Callers name their flag for it before loading anything.
        **defaults: keyword arguments passed to the factory unless the caller overrides them.
    """
    if kind not in ("image", "set"):
        raise ValueError(f"register({name!r}): kind must be 'image' or 'set', got {kind!r}")
    if ":" not in factory:
        raise ValueError(f"register({name!r}): factory must be 'module:function', got {factory!r}")
    _REGISTRY[name] = ScorerEntry(name, factory, description, kind, tuple(tuple(w) for w in weights),
                                  tuple(defaults.items()), folder)


def _entry(name: str) -> ScorerEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise EPDError(f"unknown metric {name!r}; registered: {', '.join(_REGISTRY)} "
                       "(see `epd metrics list`)") from None


def list_scorers() -> list[tuple[str, str]]:
    """``[(name, description), ...]`` in registration order."""
    return [(e.name, e.description) for e in _REGISTRY.values()]


def scorer_kind(name: str) -> str:
    """``"image"`` or ``"set"``."""
    return _entry(name).kind


def required_folder(name: str) -> str:
    """What ``weights_dir`` must hold for scorer ``name`` (e.g. the trained digits backbone folder), or ``""``."""
    return _entry(name).folder


def required_weights(name: str) -> list[tuple[str, str]]:
    """Weight specs ``(kind, name)`` that scorer ``name`` loads (checked before anything is loaded)."""
    return list(_entry(name).weights)


def resolve_weights(names, weights_dir: str | os.PathLike | None = None,
                    paths: dict[str, str] | None = None) -> dict[str, Path]:
    """Resolve every weight file the scorers ``names`` need; one error lists all missing files.

    Args:
        names (`str` or `list[str]`): scorer names.
        weights_dir (`str`, *optional*): a weights root tried first (``<weights_dir>/<relative path>``);
            ``$EPD_WEIGHTS_DIR`` and ``data/weights`` are tried as usual.
        paths (`dict`, *optional*): explicit file per weight name (e.g. ``{"hps": "/x/HPS.pt"}``), tried first.

    Returns:
        `dict[str, Path]`: weight name -> local path.
    """
    from ..backbones import weights as W

    names = [names] if isinstance(names, str) else list(names)
    pairs = []
    for n in names:
        for p in required_weights(n):
            if p not in pairs:
                pairs.append(p)
    explicit = {}
    for kind, wname in pairs:
        if paths and paths.get(wname):
            explicit[wname] = paths[wname]
        elif weights_dir is not None:
            explicit[wname] = str(Path(weights_dir) / W.REGISTRY[(kind, wname)].rel)
    found = W.check_all(pairs, explicit)
    return {wname: p for (kind, wname), p in found.items()}


def get_scorer(name: str, weights_dir: str | os.PathLike | None = None, device: str = "cpu", **kw):
    """Build scorer ``name`` from local weights (heavy imports happen here, not at import time).

    Args:
        name (`str`): registered name (``epd metrics list``).
        weights_dir (`str`, *optional*): weights root tried before ``$EPD_WEIGHTS_DIR`` / ``data/weights``.
        device (`str`): torch device.
        **kw: factory options (``batch_size``, ``paths``, model-size overrides for tests, ...).

    Returns:
        An image scorer (callable) or a set scorer (``.compute``).
    """
    e = _entry(name)
    mod_name, fn_name = e.factory.split(":")
    if e.weights:  # fail listing every missing file before importing anything heavy
        resolve_weights(name, weights_dir, kw.get("paths"))
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as err:
        raise EPDError(f"metric {name!r}: its implementation {mod_name} is not available ({err})") from None
    factory = getattr(mod, fn_name)
    args = dict(e.defaults)
    args.update(kw)
    scorer = factory(weights_dir=weights_dir, device=device, **args)
    if getattr(scorer, "name", None) in (None, "scorer"):
        try:
            scorer.name = name
        except AttributeError:
            pass
    return scorer


_S = "scorer"
register("hps", "epd.rewards.hps:make_hps",
         "HPSv2.1: open_clip ViT-H-14 + HPS_v2.1 checkpoint; cosine of unit image/text features (~0.25-0.30)",
         weights=[(_S, "hps")])
register("pickscore", "epd.rewards.pickscore:make_pickscore",
         "PickScore_v1 (transformers CLIP-H): exp(logit_scale) * cosine (~21-23)",
         weights=[(_S, "pickscore"), (_S, "pickscore_processor")])
register("imagereward", "epd.rewards.imagereward:make_imagereward",
         "ImageReward-v1.0, official normalisation (raw - 0.16717) / 1.03334 (~0-1)",
         weights=[(_S, "imagereward"), (_S, "imagereward_med_config"), (_S, "imagereward_bert")])
register("imagereward_rlepd", "epd.rewards.imagereward:make_imagereward",
         "ImageReward with the original RLEPD +3*1.03334 offset (compatibility only; = imagereward + 3.1000)",
         weights=[(_S, "imagereward"), (_S, "imagereward_med_config"), (_S, "imagereward_bert")],
         convention="rlepd")
register("clip", "epd.rewards.clip_score:make_clip",
         "CLIP score as in the original: raw cosine, OpenAI ViT-L/14, no x100, no clamp (~0.27-0.29)",
         weights=[(_S, "clip_l14")])
register("clip100", "epd.rewards.clip_score:make_clip",
         "CLIP score, common convention 100 * max(cos, 0), OpenAI ViT-L/14 (torchmetrics CLIPScore scale)",
         weights=[(_S, "clip_l14")], convention="clip100")
register("aesthetic", "epd.rewards.aesthetic:make_aesthetic",
         "LAION aesthetic predictor v2 (MLP on L2-normalised CLIP ViT-L/14 image embedding, ~5-6)",
         weights=[(_S, "clip_l14"), (_S, "aesthetic")])
register("mps", "epd.rewards.mps:make_mps",
         "MPS (Kwai-Kolors) overall condition: condition-masked cross-attention over CLIP-H, exp(logit_scale)*cos",
         weights=[(_S, "mps"), (_S, "mps_processor")])
register("fid_clean", "epd.metrics.fid:make_fid_clean",
         "FID, clean-fid protocol (PIL bicubic float resize to 299, FID Inception pool3) vs a reference set",
         kind="set", weights=[(_S, "inception")])
_DIGITS = "the trained digits backbone folder (`epd backbone train --out DIR`, holds classifier.safetensors)"
register("digits_alignment", "epd.backbones.digits.scorers:make_alignment",
         "digits backbone: log-probability of the prompted digit under the classifier (<= 0; 0 is certain)",
         folder=_DIGITS)
register("digits_realism", "epd.backbones.digits.scorers:make_realism",
         "digits backbone: realism score of the embedded classifier", folder=_DIGITS)
register("digits_typicality", "epd.backbones.digits.scorers:make_typicality",
         "digits backbone: how typical the image's distance to its class feature Gaussian is (0 = the median of "
         "real train digits)", folder=_DIGITS)
register("digits_accuracy", "epd.backbones.digits.scorers:make_accuracy",
         "digits backbone: 1 if the classifier predicts the prompted digit", folder=_DIGITS)
register("digits_fd", "epd.backbones.digits.scorers:make_fd",
         "digits backbone: Frechet distance of classifier features vs the bundled digits", kind="set",
         folder=_DIGITS)
