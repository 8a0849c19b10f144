"""LAION improved aesthetic predictor v2 (``sac+logos+ava1-l14-linearMSE.pth``).

An MLP ``768 -> 1024 -> 128 -> 64 -> 16 -> 1`` (dropouts between, no activations, as released) applied to the
L2-normalised OpenAI CLIP ViT-L/14 image embedding. Layer names match the released state dict
(``layers.0.weight``, ``layers.2.weight``, ..., ``layers.7.weight``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import ImageScorer, WrongWeightsError, check_state_dict, load_checkpoint
from .clip_score import load_openai_clip

__all__ = ["AestheticMLP", "AestheticScorer", "make_aesthetic"]


class AestheticMLP(nn.Module):
    """The released predictor head; ``input_size`` is the CLIP embedding width (768 for ViT-L/14)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class AestheticScorer(ImageScorer):
    """Aesthetic score (prompt-independent; prompts are accepted for the common interface).

    Args:
        clip_model: OpenAI CLIP module; preprocess: its PIL transform; mlp: :class:`AestheticMLP`.
    """

    name = "aesthetic"

    def __init__(self, clip_model, preprocess, mlp, batch_size=8, device="cpu"):
        super().__init__(batch_size, device)
        self.model, self.preprocess, self.mlp = clip_model, preprocess, mlp.eval().to(self.device)

    def _score_batch(self, pil_images, prompts):
        dtype = self.model.visual.conv1.weight.dtype
        x = torch.stack([self.preprocess(im) for im in pil_images]).to(self.device, dtype)
        emb = F.normalize(self.model.encode_image(x)).float()
        return self.mlp(emb).squeeze(-1)


def make_aesthetic(weights_dir=None, device="cpu", paths=None, batch_size: int = 8,
                   precision: str = "fp32") -> AestheticScorer:
    """Build the aesthetic scorer from ``clip/ViT-L-14.pt`` and ``aesthetic/sac+logos+ava1-l14-linearMSE.pth``.

    Args:
        weights_dir (`str`, *optional*): weights root tried first.
        device (`str`): torch device.
        paths (`dict`, *optional*): ``{"clip_l14": path, "aesthetic": path}``.
        batch_size (`int`): images per forward pass.
        precision (`str`): CLIP precision, ``"fp32"`` or ``"fp16"`` (CUDA).
    """
    from . import resolve_weights

    p = resolve_weights("aesthetic", weights_dir, paths)
    sd = load_checkpoint(p["aesthetic"], "LAION aesthetic predictor")
    if not isinstance(sd, dict) or "layers.0.weight" not in sd:
        keys = list(sd)[:3] if isinstance(sd, dict) else type(sd).__name__
        raise WrongWeightsError(f"{p['aesthetic']}: not a LAION aesthetic predictor state_dict "
                                f"(expected 'layers.0.weight' ...; got {keys})")
    mlp = AestheticMLP(sd["layers.0.weight"].shape[1])
    check_state_dict(mlp, sd, p["aesthetic"], "LAION aesthetic MLP")
    model, preprocess = load_openai_clip(p["clip_l14"], device, precision)
    emb_dim = model.text_projection.shape[1]
    if emb_dim != mlp.input_size:
        raise WrongWeightsError(f"{p['aesthetic']}: MLP expects {mlp.input_size}-d embeddings but the CLIP model "
                                f"{p['clip_l14']} gives {emb_dim}-d (the predictor needs CLIP ViT-L/14)")
    scorer = AestheticScorer(model, preprocess, mlp, batch_size, device)
    scorer.weights = {k: str(v) for k, v in p.items()}
    return scorer
