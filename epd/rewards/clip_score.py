"""CLIP score with OpenAI CLIP ViT-L/14 (the ``clip`` package), from a local checkpoint.

Two conventions, registered under distinct names so they are never mixed in one column:

* ``clip`` — the original RLEPD/ImageReward ``CLIPScore``: raw cosine of unit image and text features
  (no x100, no clamp; about 0.27-0.29 on the FLUX/SD evaluations).
* ``clip100`` — the common convention (torchmetrics ``CLIPScore``): ``100 * max(cos, 0)``.

Text is tokenised with ``clip.tokenize(prompt, truncate=True)`` (77 tokens); images use the package's
preprocess (shortest side to the model resolution, bicubic, centre crop, CLIP normalisation).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .base import ImageScorer, WrongWeightsError, load_checkpoint

__all__ = ["load_openai_clip", "CLIPScorer", "make_clip"]


def _import_clip():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # clip imports the deprecated pkg_resources
        import clip

    return clip


def load_openai_clip(path, device="cpu", precision: str = "fp32"):
    """Load an OpenAI CLIP checkpoint (JIT archive as released, or a plain state_dict) without downloading.

    The architecture is inferred from the tensor shapes (``clip.model.build_model``), so tiny test checkpoints
    load the same way as ``ViT-L-14.pt``.

    Args:
        path: local checkpoint file.
        device (`str`): torch device.
        precision (`str`): ``"fp32"`` (default) or ``"fp16"`` (CUDA only; the original scorers ran CLIP in fp16).

    Returns:
        `(model, preprocess)`: the CLIP module and its PIL preprocess transform.
    """
    _import_clip()
    from clip.clip import _transform
    from clip.model import build_model

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load deprecation notice
            sd = torch.jit.load(str(path), map_location="cpu").eval().state_dict()
    except RuntimeError:
        sd = load_checkpoint(path, "OpenAI CLIP checkpoint")
    if not isinstance(sd, dict) or "visual.proj" not in sd and "visual.layer1.0.conv1.weight" not in sd:
        keys = list(sd)[:3] if isinstance(sd, dict) else type(sd).__name__
        raise WrongWeightsError(f"{path}: not an OpenAI CLIP checkpoint (no 'visual.*' weights; keys start {keys})")
    try:
        model = build_model(dict(sd))
    except (KeyError, RuntimeError, AssertionError) as e:
        raise WrongWeightsError(f"{path}: not a loadable OpenAI CLIP checkpoint ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200]})") from None
    model = model.to(device)
    if precision == "fp32" or torch.device(device).type == "cpu":
        model.float()
    return model.eval(), _transform(model.visual.input_resolution)


class CLIPScorer(ImageScorer):
    """CLIP score.

    Args:
        model: OpenAI CLIP module.
        preprocess: its PIL transform.
        convention (`str`): ``"cosine"`` (raw cosine, the original's) or ``"clip100"`` (``100 * max(cos, 0)``).
    """

    def __init__(self, model, preprocess, convention="cosine", batch_size=8, device="cpu"):
        super().__init__(batch_size, device)
        if convention not in ("cosine", "clip100"):
            raise ValueError(f"convention must be 'cosine' or 'clip100', got {convention!r}")
        self.model, self.preprocess, self.convention = model, preprocess, convention
        self.name = "clip" if convention == "cosine" else "clip100"

    def _score_batch(self, pil_images, prompts):
        clip = _import_clip()
        dtype = self.model.visual.conv1.weight.dtype
        x = torch.stack([self.preprocess(im) for im in pil_images]).to(self.device, dtype)
        t = clip.tokenize(prompts, truncate=True).to(self.device)
        img = F.normalize(self.model.encode_image(x).float())
        txt = F.normalize(self.model.encode_text(t).float())
        cos = (img * txt).sum(-1)
        return cos if self.convention == "cosine" else 100 * cos.clamp(min=0)


def make_clip(weights_dir=None, device="cpu", convention: str = "cosine", paths=None, batch_size: int = 8,
              precision: str = "fp32") -> CLIPScorer:
    """Build the CLIP scorer from ``data/weights/clip/ViT-L-14.pt`` (or another local path).

    Args:
        weights_dir (`str`, *optional*): weights root tried first.
        device (`str`): torch device.
        convention (`str`): ``"cosine"`` (registered as ``clip``) or ``"clip100"`` (registered as ``clip100``).
        paths (`dict`, *optional*): ``{"clip_l14": path}``.
        batch_size (`int`): images per forward pass.
        precision (`str`): ``"fp32"`` or ``"fp16"`` (CUDA).
    """
    from . import resolve_weights

    path = resolve_weights("clip", weights_dir, paths)["clip_l14"]
    model, preprocess = load_openai_clip(path, device, precision)
    scorer = CLIPScorer(model, preprocess, convention, batch_size, device)
    scorer.weights = {"clip_l14": str(path)}
    return scorer
