"""PickScore_v1 (transformers CLIP-H) from local folders.

Score as on the model card: ``exp(logit_scale) * cos(text_emb, image_emb)``; the processor pads/truncates text
to 77 tokens and preprocesses images (shortest side 224, bicubic, centre crop, CLIP normalisation).
"""

from __future__ import annotations

import torch

from ..errors import EPDError
from .base import ImageScorer, WrongWeightsError

__all__ = ["PickScoreScorer", "make_pickscore"]


class PickScoreScorer(ImageScorer):
    """PickScore scorer.

    Args:
        model: transformers ``CLIPModel`` with PickScore weights.
        processor: the CLIP-ViT-H-14 ``CLIPProcessor`` (tokenizer + image processor).
    """

    name = "pickscore"

    def __init__(self, model, processor, batch_size=8, device="cpu"):
        super().__init__(batch_size, device)
        self.model, self.processor = model.eval().to(self.device), processor

    def _score_batch(self, pil_images, prompts):
        img_in = self.processor(images=pil_images, return_tensors="pt").to(self.device)
        txt_in = self.processor(text=prompts, padding=True, truncation=True, max_length=77,
                                return_tensors="pt").to(self.device)
        img = self.model.get_image_features(**img_in).float()
        txt = self.model.get_text_features(**txt_in).float()
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return self.model.logit_scale.exp().float() * (img * txt).sum(-1)


def load_clip_model(path, what: str):
    """``CLIPModel.from_pretrained(path, local_files_only=True)`` with a clear error for a wrong/broken folder."""
    from transformers import CLIPConfig, CLIPModel

    try:
        cfg = CLIPConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise WrongWeightsError(f"{path}: not a transformers CLIP model folder for {what} ({e})") from None
    if getattr(cfg, "model_type", None) != "clip":
        raise WrongWeightsError(f"{path}: config model_type is {cfg.model_type!r}, expected 'clip' ({what})")
    try:
        model, info = CLIPModel.from_pretrained(path, local_files_only=True, output_loading_info=True)
    except Exception as e:
        raise WrongWeightsError(f"{path}: cannot load {what} ({type(e).__name__}: {str(e)[:300]})") from None
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    if missing or info.get("mismatched_keys"):
        raise WrongWeightsError(f"{path}: weights do not match a CLIPModel for {what}: missing {missing[:3]}, "
                                f"mismatched {info.get('mismatched_keys', [])[:3]}")
    return model


def load_processor(path, what: str):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, local_files_only=True, use_fast=False)
    except Exception as e:
        raise EPDError(f"{path}: cannot load the CLIP processor for {what} ({type(e).__name__}: {str(e)[:300]}); "
                       "expected tokenizer files plus preprocessor_config.json") from None


def make_pickscore(weights_dir=None, device="cpu", paths=None, batch_size: int = 8) -> PickScoreScorer:
    """Build PickScore from ``data/weights/pickscore/{PickScore_v1,processor}`` (or other local folders).

    Args:
        weights_dir (`str`, *optional*): weights root tried first.
        device (`str`): torch device.
        paths (`dict`, *optional*): ``{"pickscore": dir, "pickscore_processor": dir}``.
        batch_size (`int`): images per forward pass.
    """
    from . import resolve_weights

    p = resolve_weights("pickscore", weights_dir, paths)
    model = load_clip_model(p["pickscore"], "PickScore_v1")
    processor = load_processor(p["pickscore_processor"], "PickScore")
    scorer = PickScoreScorer(model, processor, batch_size, device)
    scorer.weights = {k: str(v) for k, v in p.items()}
    return scorer
