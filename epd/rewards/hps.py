"""HPSv2.1 (Human Preference Score v2.1) on open_clip, from a local checkpoint.

The ``hpsv2`` package cannot score offline (it always downloads the laion2B ViT-H-14 base weights first), so
this loads the same architecture through open_clip (``pretrained=None``) and the ``state_dict`` of
``HPS_v2.1_compressed.pt``; the keys are identical. Score, as in ``hpsv2.img_score``: the diagonal of
``image_features @ text_features.T`` with unit-norm features (no x100).
"""

from __future__ import annotations

import torch

from .base import ImageScorer, check_state_dict, load_checkpoint

__all__ = ["HPSScorer", "make_hps"]


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


def make_hps(weights_dir=None, device="cpu", model_name: str = "ViT-H-14", paths=None, batch_size: int = 8,
             precision: str = "fp32") -> HPSScorer:
    """Build the HPSv2.1 scorer from ``data/weights/hps/HPS_v2.1_compressed.pt`` (or another local path).

    Args:
        weights_dir (`str`, *optional*): weights root tried first.
        device (`str`): torch device.
        model_name (`str`): open_clip architecture (``ViT-H-14``; tests register tiny configs).
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

    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None, output_dict=True)
    check_state_dict(model, sd, path, f"HPSv2.1 open_clip {model_name}")
    scorer = HPSScorer(model, preprocess, open_clip.get_tokenizer(model_name), batch_size, device, precision)
    scorer.weights = {"hps": str(path)}
    return scorer
