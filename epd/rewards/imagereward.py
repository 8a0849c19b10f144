"""ImageReward-v1.0 through the ``image-reward`` package's model class, from local files only.

``ImageReward.load`` would fetch the checkpoint, ``med_config.json`` and the ``bert-base-uncased`` tokenizer from
the hub; here all three come from local paths (:mod:`epd.backbones.weights`), the BLIP tokenizer is built from a
local ``vocab.txt`` with the same ``[DEC]``/``[ENC]`` specials, and the checkpoint loads strictly (the package
loads with ``strict=False``, which would silently accept a wrong file).

The architecture is read from the files themselves, so smaller checkpoints (tests, the random stand-ins of
``epd weights fake``) load with no extra argument: the vision transformer's size from the checkpoint's tensor shapes
(``ViT-L/16`` at 224 px for the release), the BLIP text encoder from ``med_config.json`` (BERT-base for the
release), and the reward head's input width from ``mlp.layers.0.weight`` (768 for the release, which the package
hard-codes as ``MLP(768)``; any other width replaces that head by the package's ``MLP`` of the checkpoint's width).

Scoring is the package's ``score`` batched: prompts tokenised to 35 tokens, BLIP image-grounded text encoder,
``[CLS]`` feature, MLP, then

* ``convention="official"`` (registered ``imagereward``): ``(raw - 0.16717) / 1.03334``;
* ``convention="rlepd"`` (registered ``imagereward_rlepd``): the original RLEPD scorer's value,
  official ``+ 3 * 1.03334`` (= +3.1000). Use it only to compare with the original's result files.
"""

from __future__ import annotations

import contextlib
import math

import torch

from ..errors import EPDError
from .base import ImageScorer, WrongWeightsError, check_state_dict, load_checkpoint

__all__ = ["ImageRewardScorer", "make_imagereward", "vit_spec_from_state_dict", "build_imagereward_model",
           "mlp_width_from_state_dict", "RELEASE_MLP_WIDTH"]

_PREFIX = "blip.visual_encoder."
RELEASE_MLP_WIDTH = 768  # ImageReward-v1.0: BERT-base text encoder -> MLP(768)


def vit_spec_from_state_dict(sd: dict, heads: int | None = None) -> dict:
    """Infer the BLIP ViT size (``embed_dim``, ``depth``, ``patch_size``, ``img_size``, ``num_heads``, ``mlp_ratio``).

    Args:
        sd (`dict`): ImageReward state dict.
        heads (`int`, *optional*): attention heads (not recoverable from shapes; default ``embed_dim // 64``).
    """
    try:
        pos = sd[_PREFIX + "pos_embed"]
        patch = sd[_PREFIX + "patch_embed.proj.weight"]
        fc1 = sd[_PREFIX + "blocks.0.mlp.fc1.weight"]
    except KeyError as e:
        raise WrongWeightsError(f"not an ImageReward checkpoint: no {e.args[0]!r}") from None
    dim = int(pos.shape[-1])
    depth = len({k[len(_PREFIX):].split(".")[1] for k in sd if k.startswith(_PREFIX + "blocks.")})
    grid = math.isqrt(int(pos.shape[1]) - 1)
    return dict(embed_dim=dim, depth=depth, patch_size=int(patch.shape[-1]), img_size=grid * int(patch.shape[-1]),
                num_heads=heads or max(dim // 64, 1), mlp_ratio=fc1.shape[0] / dim)


def _local_tokenizer(bert_dir):
    """The BLIP tokenizer (``init_tokenizer``) from a local ``bert-base-uncased`` folder."""
    from transformers import BertTokenizer

    try:
        tok = BertTokenizer.from_pretrained(str(bert_dir), local_files_only=True)
    except Exception as e:
        raise EPDError(f"{bert_dir}: cannot load the BERT tokenizer for ImageReward ({type(e).__name__}: {e}); "
                       "expected a bert-base-uncased folder with vocab.txt") from None
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tok.enc_token_id = tok.additional_special_tokens_ids[0]
    return tok


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def mlp_width_from_state_dict(sd: dict) -> int:
    """Input width of the reward head (``mlp.layers.0.weight`` is ``(1024, width)``); 768, the release's, when the
    key is absent (the strict load then names it as missing)."""
    w = sd.get("mlp.layers.0.weight")
    return int(w.shape[1]) if isinstance(w, torch.Tensor) and w.ndim == 2 else RELEASE_MLP_WIDTH


def build_imagereward_model(med_config, bert_dir, vit: dict, mlp_width: int = RELEASE_MLP_WIDTH):
    """Construct the package's ``ImageReward`` module offline (random weights).

    Args:
        med_config: local ``med_config.json``.
        bert_dir: local folder with the BERT ``vocab.txt``.
        vit (`dict`): ViT size from :func:`vit_spec_from_state_dict`.
        mlp_width (`int`): reward-head input width (the text encoder's ``hidden_size``); the package's own head is
            ``MLP(768)`` and is replaced by ``MLP(mlp_width)`` when they differ.
    """
    import ImageReward.models.BLIP.blip_pretrain as bp
    from ImageReward.ImageReward import MLP
    from ImageReward.ImageReward import ImageReward as IRModel
    from ImageReward.models.BLIP.vit import VisionTransformer

    if vit["img_size"] != 224:
        raise WrongWeightsError(f"ImageReward checkpoint has a {vit['img_size']} px ViT; the model preprocesses to 224")

    def create_vit(*_a, **_k):
        enc = VisionTransformer(img_size=vit["img_size"], patch_size=vit["patch_size"], embed_dim=vit["embed_dim"],
                                depth=vit["depth"], num_heads=vit["num_heads"], mlp_ratio=vit["mlp_ratio"])
        return enc, vit["embed_dim"]

    with _patched(bp, "create_vit", create_vit), _patched(bp, "init_tokenizer", lambda: _local_tokenizer(bert_dir)):
        try:
            model = IRModel(med_config=str(med_config), device="cpu")
        except (ValueError, OSError, TypeError) as e:  # unreadable med_config.json
            raise EPDError(f"{med_config}: cannot build ImageReward from this med_config ({e})") from None
    if mlp_width != model.mlp.input_size:
        model.mlp = MLP(mlp_width)
    return model


class ImageRewardScorer(ImageScorer):
    """ImageReward scorer (batched version of the package's ``ImageReward.score``).

    Args:
        model: the package's ``ImageReward`` module with weights.
        convention (`str`): ``"official"`` or ``"rlepd"`` (adds ``3 * model.std``).
    """

    def __init__(self, model, convention="official", batch_size=8, device="cpu"):
        super().__init__(batch_size, device)
        if convention not in ("official", "rlepd"):
            raise ValueError(f"convention must be 'official' or 'rlepd', got {convention!r}")
        self.model, self.convention = model.eval().to(self.device), convention
        self.model.device = self.device
        self.name = "imagereward" if convention == "official" else "imagereward_rlepd"
        self.offset = 3 * float(model.std) if convention == "rlepd" else 0.0

    def _score_batch(self, pil_images, prompts):
        m = self.model
        text = m.blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35,
                                return_tensors="pt").to(self.device)
        x = torch.stack([m.preprocess(im) for im in pil_images]).to(self.device)
        image_embeds = m.blip.visual_encoder(x)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        out = m.blip.text_encoder(text.input_ids, attention_mask=text.attention_mask,
                                  encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
                                  return_dict=True)
        raw = m.mlp(out.last_hidden_state[:, 0, :].float()).squeeze(-1)
        return (raw - m.mean) / m.std + self.offset


def make_imagereward(weights_dir=None, device="cpu", convention: str = "official", paths=None,
                     batch_size: int = 8, vit_heads: int | None = None) -> ImageRewardScorer:
    """Build ImageReward from ``imagereward/{ImageReward.pt, med_config.json, bert-base-uncased/}``.

    Args:
        weights_dir (`str`, *optional*): weights root tried first.
        device (`str`): torch device.
        convention (`str`): ``"official"`` or ``"rlepd"`` (original's +3*1.03334 offset).
        paths (`dict`, *optional*): ``{"imagereward": pt, "imagereward_med_config": json, "imagereward_bert": dir}``.
        batch_size (`int`): images per forward pass.
        vit_heads (`int`, *optional*): ViT attention heads if not ``embed_dim // 64``.
    """
    from . import resolve_weights

    p = resolve_weights("imagereward", weights_dir, paths)
    sd = load_checkpoint(p["imagereward"], "ImageReward checkpoint")
    if not isinstance(sd, dict):
        raise WrongWeightsError(f"{p['imagereward']}: not an ImageReward state_dict")
    try:
        vit = vit_spec_from_state_dict(sd, vit_heads)
    except WrongWeightsError as e:
        raise WrongWeightsError(f"{p['imagereward']}: {e}") from None
    model = build_imagereward_model(p["imagereward_med_config"], p["imagereward_bert"], vit,
                                    mlp_width_from_state_dict(sd))
    check_state_dict(model, sd, p["imagereward"], "ImageReward-v1.0",
                     optional_prefixes=("blip.vision_proj.", "blip.text_proj."))
    if model.blip.text_encoder.config.vocab_size < len(model.blip.tokenizer):
        raise WrongWeightsError(f"{p['imagereward_bert']}: tokenizer has {len(model.blip.tokenizer)} tokens but the "
                                f"text encoder only {model.blip.text_encoder.config.vocab_size}")
    scorer = ImageRewardScorer(model, convention, batch_size, device)
    scorer.weights = {k: str(v) for k, v in p.items()}
    return scorer
