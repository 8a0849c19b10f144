"""HPSv2.1 (Human Preference Score v2.1) on open_clip, from a local checkpoint.

The ``hpsv2`` package cannot score offline (it always downloads the laion2B ViT-H-14 base weights first), so
this loads the same architecture through open_clip (``pretrained=None``) and the ``state_dict`` of
``HPS_v2.1_compressed.pt``; the keys are identical. Score, as in ``hpsv2.img_score``: the diagonal of
``image_features @ text_features.T`` with unit-norm features (no x100).

Architecture: ``ViT-H-14`` (the release), unless an ``open_clip_config.json`` lies beside the checkpoint. That file
is open_clip's own local-folder config (``{"model_cfg": {...}, "preprocess_cfg": {...}}``, as open_clip's
``local-dir:`` schema reads it); when present, the model, its preprocessing and its tokenizer are built from it, so
other sizes (e.g. the tiny random stand-ins of ``epd weights fake``) load with no extra argument. The released
HPSv2.1 files have no such config, so they build ViT-H-14. An explicit ``model_name`` overrides both.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from .base import ImageScorer, WrongWeightsError, check_state_dict, load_checkpoint

__all__ = ["HPSScorer", "make_hps", "hps_architecture", "DEFAULT_ARCH", "CONFIG_NAME"]

DEFAULT_ARCH = "ViT-H-14"
CONFIG_NAME = "open_clip_config.json"


class HPSScorer(ImageScorer):
    """HPSv2.1 scorer (open_clip model + its val transform + tokenizer).

    Args:
        model: open_clip ``CLIP`` module with HPS weights loaded.
        preprocess: open_clip val transform (PIL -> normalised tensor).
        tokenizer: open_clip tokenizer.
        precision (`str`): ``"fp32"`` or ``"amp"`` (fp16 autocast on CUDA, as the original scorer ran).
    """

    name = "hps"

    def __init__(self, model, preprocess, tokenizer, batch_size=8, device="cpu", precision="fp32"):
        super().__init__(batch_size, device)
        self.model, self.preprocess, self.tokenizer = model.eval().to(self.device), preprocess, tokenizer
        self.precision = precision

    def _score_batch(self, pil_images, prompts):
        x = torch.stack([self.preprocess(im) for im in pil_images]).to(self.device)
        t = self.tokenizer(prompts).to(self.device)
        amp = self.precision == "amp" and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=amp):
            out = self.model(x, t)
        img, txt = out["image_features"].float(), out["text_features"].float()
        return (img * txt).sum(-1)


class _NoWeightsNotice(logging.Filter):
    """Drops open_clip's warnings that the model it built has no weights: the weights are the HPS checkpoint,
    loaded right after (open_clip only looks for its own file names)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "no CLIP weights found" not in msg and "No pretrained weights loaded" not in msg


@contextlib.contextmanager
def _quiet_open_clip():
    root, f = logging.getLogger(), _NoWeightsNotice()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


def hps_architecture(checkpoint, model_name: str | None = None) -> str:
    """The open_clip model identifier to build for an HPS checkpoint.

    Args:
        checkpoint: the checkpoint file.
        model_name (`str`, *optional*): an explicit open_clip name (wins when given).

    Returns:
        `str`: ``model_name``; else ``"local-dir:<folder>"`` when ``<folder>/open_clip_config.json`` exists beside
        the checkpoint; else :data:`DEFAULT_ARCH` (``ViT-H-14``, the released HPSv2.1).
    """
    if model_name:
        return model_name
    folder = Path(checkpoint).absolute().parent  # not resolve(): a DVC-linked file's cache folder has no config
    if (folder / CONFIG_NAME).is_file():
        return f"local-dir:{folder}"
    return DEFAULT_ARCH


def make_hps(weights_dir=None, device="cpu", model_name: str | None = None, paths=None, batch_size: int = 8,
             precision: str = "fp32") -> HPSScorer:
    """Build the HPSv2.1 scorer from ``data/weights/hps/HPS_v2.1_compressed.pt`` (or another local path).

    Args:
        weights_dir (`str`, *optional*): weights root tried first.
        device (`str`): torch device.
        model_name (`str`, *optional*): open_clip architecture; default :func:`hps_architecture` (the
            ``open_clip_config.json`` beside the checkpoint, else ``ViT-H-14``).
        paths (`dict`, *optional*): ``{"hps": path}`` explicit file.
        batch_size (`int`): images per forward pass.
        precision (`str`): ``"fp32"`` or ``"amp"``.
    """
    from . import resolve_weights

    path = resolve_weights("hps", weights_dir, paths)["hps"]
    ckpt = load_checkpoint(path, "HPSv2.1 checkpoint")
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    if isinstance(sd, dict) and sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}

    import open_clip

    arch = hps_architecture(path, model_name)
    try:
        with _quiet_open_clip():
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None, output_dict=True,
                                                                         load_weights=False)
    except (ValueError, KeyError, TypeError) as e:  # an unreadable open_clip_config.json
        raise WrongWeightsError(f"{path}: cannot build the open_clip model {arch!r} ({e})") from None
    check_state_dict(model, sd, path, f"HPSv2.1 open_clip {arch}")
    scorer = HPSScorer(model, preprocess, open_clip.get_tokenizer(arch), batch_size, device, precision)
    scorer.weights = {"hps": str(path)}
    return scorer
