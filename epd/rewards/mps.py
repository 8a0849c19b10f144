"""MPS (Multi-dimensional Preference Score, Kwai-Kolors, CVPR 2024), "overall" condition.

MPS is not on PyPI and its released checkpoint is a whole pickled model that needs the repository's
``trainer/models`` code to unpickle. This module re-implements the model (a transformers ``CLIPModel`` plus a
4-layer condition-masked cross-attention "cross_model") with the **same state-dict key names**, and loads a
``state_dict`` file (convert once where the MPS code is available:
``torch.save(torch.load("MPS_overall_checkpoint.pth").state_dict(), "MPS_overall_state_dict.pt")``).

Scoring, as the repository's ``infer_one_sample``:

1. ``text_f``/``cond_f``: token-level text features ``text_projection(last_hidden_state)`` of the prompt and of the
   overall condition string (both padded to 77 tokens, no attention mask); ``text_eos``: projected pooled feature;
   ``image_f``: ``visual_projection`` of every vision token (before the post-layernorm, as in MPS).
2. ``s = max_j <text_f_i, cond_f_j>`` per prompt token, divided by its maximum; tokens with ``s > 0.3`` are kept.
3. ``cross_model(image_f, text_f, mask)[:, 0]`` (image tokens attend to the kept prompt tokens), unit-normalised.
4. score = ``exp(logit_scale) * cos(text_eos, image feature)``.

The normalisation in step 2 uses each image's own maximum; MPS scored one image at a time, where that is the
same thing (its batched ``forward`` divides by the batch maximum, which would make scores depend on the batch).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EPDError
from .base import ImageScorer, WrongWeightsError, check_state_dict, load_checkpoint

__all__ = ["OVERALL_CONDITION", "CrossModel", "MPSModel", "MPSScorer", "make_mps", "VIT_H_14_CLIP_CONFIG"]

OVERALL_CONDITION = ("light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, "
                     "structure, instance, texture, quantity, attributes, position, number, location, word, things.")

# transformers CLIPConfig of laion/CLIP-ViT-H-14-laion2B-s32B-b79K (used when the processor folder has no config.json)
VIT_H_14_CLIP_CONFIG = {
    "projection_dim": 1024,
    "logit_scale_init_value": 2.6592,
    "text_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                    "num_hidden_layers": 24, "max_position_embeddings": 77, "vocab_size": 49408,
                    "hidden_act": "gelu", "layer_norm_eps": 1e-05, "projection_dim": 1024},
    "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 16,
                      "num_hidden_layers": 32, "patch_size": 14, "image_size": 224, "hidden_act": "gelu",
                      "layer_norm_eps": 1e-05, "projection_dim": 1024},
}


class _LayerNorm(nn.Module):
    """LayerNorm with a fixed zero bias (kept as a buffer, as in the MPS state dict)."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("bias", torch.zeros(dim))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)


class _Residual(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, *args):
        return self.fn(x, *args) + x


class _SwiGLU(nn.Module):
    def forward(self, x):
        x, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * x


class _Rotary(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))

    def forward(self, n, device):
        freqs = torch.outer(torch.arange(n, device=device, dtype=self.inv_freq.dtype), self.inv_freq)
        return torch.cat((freqs, freqs), dim=-1)


def _rotate(pos, t):
    half = t.shape[-1] // 2
    rot = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
    return t * pos.cos() + rot * pos.sin()


class _ParallelBlock(nn.Module):
    """Self-attention (multi-query, rotary) in parallel with a SwiGLU feed-forward, pre-norm."""

    def __init__(self, dim, dim_head, heads, ff_mult):
        super().__init__()
        self.norm = _LayerNorm(dim)
        self.heads, self.dim_head = heads, dim_head
        self.fused_dims = (dim_head * heads, dim_head, dim_head, dim * ff_mult * 2)
        self.rotary_emb = _Rotary(dim_head)
        self.fused_attn_ff_proj = nn.Linear(dim, sum(self.fused_dims), bias=False)
        self.attn_out = nn.Linear(dim_head * heads, dim, bias=False)
        self.ff_out = nn.Sequential(_SwiGLU(), nn.Linear(dim * ff_mult, dim, bias=False))

    def forward(self, x):
        b, n, _ = x.shape
        x = self.norm(x)
        q, k, v, ff = self.fused_attn_ff_proj(x).split(self.fused_dims, dim=-1)
        q = q.view(b, n, self.heads, self.dim_head).transpose(1, 2)
        pos = self.rotary_emb(n, x.device).to(x.dtype)
        q, k = _rotate(pos, q) * self.dim_head ** -0.5, _rotate(pos, k)
        sim = torch.einsum("bhid,bjd->bhij", q, k)
        attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
        out = torch.einsum("bhij,bjd->bhid", attn, v).transpose(1, 2).reshape(b, n, -1)
        return self.attn_out(out) + self.ff_out(ff)


class _CrossAttention(nn.Module):
    """Queries from image tokens, one shared key/value head from text tokens, additive mask, parallel FF."""

    def __init__(self, dim, dim_head, heads, ff_mult):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.norm = _LayerNorm(dim)
        self.context_norm = nn.Identity()
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, dim_head * 2, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.ff = nn.Sequential(nn.Linear(dim, dim * ff_mult * 2, bias=False), _SwiGLU(),
                                nn.Linear(dim * ff_mult, dim, bias=False))

    def forward(self, x, context, mask):
        b, n, _ = x.shape
        x = self.norm(x)
        q = self.to_q(x).view(b, n, self.heads, self.dim_head).transpose(1, 2) * self.dim_head ** -0.5
        k, v = self.to_kv(self.context_norm(context)).chunk(2, dim=-1)
        sim = torch.einsum("bhid,bjd->bhij", q, k) + mask.unsqueeze(1)
        attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
        out = torch.einsum("bhij,bjd->bhid", attn, v).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out) + self.ff(x)


class CrossModel(nn.Module):
    """MPS ``Cross_model``: ``layer_num`` x [cross-attention to text, parallel self-attention/FF], residual each.

    Args:
        dim (`int`): token width (the CLIP projection dim, 1024 for CLIP-H).
        layer_num (`int`), dim_head (`int`), heads (`int`), ff_mult (`int`): released values 4, 64, 16, 4.
    """

    def __init__(self, dim=1024, layer_num=4, dim_head=64, heads=16, ff_mult=4):
        super().__init__()
        self.layers = nn.ModuleList([
            nn.ModuleList([_Residual(_CrossAttention(dim, dim_head, heads, ff_mult)),
                           _Residual(_ParallelBlock(dim, dim_head, heads, ff_mult))])
            for _ in range(layer_num)
        ])

    def forward(self, query_tokens, context_tokens, mask):
        for cross_attn, self_attn_ff in self.layers:
            query_tokens = self_attn_ff(cross_attn(query_tokens, context_tokens, mask))
        return query_tokens


def cross_dims_from_state_dict(sd: dict) -> dict:
    """``CrossModel`` sizes recovered from tensor shapes (``cross_model.layers.*``)."""
    pre = "cross_model.layers."
    try:
        to_q, to_kv = sd[pre + "0.0.fn.to_q.weight"], sd[pre + "0.0.fn.to_kv.weight"]
        ff0 = sd[pre + "0.0.fn.ff.0.weight"]
    except KeyError as e:
        raise WrongWeightsError(f"not an MPS checkpoint: no {e.args[0]!r}") from None
    dim_head = to_kv.shape[0] // 2
    layers = len({k[len(pre):].split(".")[0] for k in sd if k.startswith(pre)})
    return dict(dim=int(to_q.shape[1]), layer_num=layers, dim_head=int(dim_head),
                heads=int(to_q.shape[0] // dim_head), ff_mult=int(ff0.shape[0] // 2 // to_q.shape[1]))


class MPSModel(nn.Module):
    """``model`` (transformers ``CLIPModel``) + ``cross_model`` (:class:`CrossModel`), MPS key layout."""

    def __init__(self, clip_config, cross: dict):
        super().__init__()
        from transformers import CLIPModel

        self.model = CLIPModel(clip_config)
        self.cross_model = CrossModel(**cross)

    def text_features(self, input_ids):
        out = self.model.text_model(input_ids=input_ids)
        proj = self.model.text_projection
        return proj(out.last_hidden_state), proj(out.pooler_output)

    def image_features(self, pixel_values):
        return self.model.visual_projection(self.model.vision_model(pixel_values=pixel_values).last_hidden_state)

    def forward(self, pixel_values, input_ids, condition_ids, threshold: float = 0.3):
        text_f, text_eos = self.text_features(input_ids)
        image_f = self.image_features(pixel_values)
        cond_f, _ = self.text_features(condition_ids)
        sim = torch.einsum("bid,bjd->bji", text_f, cond_f).amax(dim=1, keepdim=True)   # (B, 1, L)
        sim = sim / sim.amax(dim=(1, 2), keepdim=True)
        mask = torch.zeros_like(sim).masked_fill(~(sim > threshold), float("-inf"))
        mask = mask.expand(-1, image_f.shape[1], -1)
        img = self.cross_model(image_f, text_f, mask)[:, 0, :]
        img = img / img.norm(dim=-1, keepdim=True)
        txt = text_eos / text_eos.norm(dim=-1, keepdim=True)
        return self.model.logit_scale.exp() * (img * txt).sum(-1)


class MPSScorer(ImageScorer):
    """MPS scorer (overall condition by default).

    Args:
        model (:class:`MPSModel`), image_processor (``CLIPImageProcessor``), tokenizer (CLIP tokenizer).
        condition (`str`): condition string; threshold (`float`): mask threshold (0.3 as released).
        precision (`str`): ``"fp32"`` or ``"fp16"`` (CUDA; the original scorer ran in fp16).
    """

    name = "mps"

    def __init__(self, model, image_processor, tokenizer, batch_size=8, device="cpu", condition=OVERALL_CONDITION,
                 threshold=0.3, precision="fp32"):
        super().__init__(batch_size, device)
        self.dtype = torch.float16 if precision == "fp16" and self.device.type == "cuda" else torch.float32
        self.model = model.eval().to(self.device, self.dtype)
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.condition, self.threshold = condition, threshold

    def _tokenize(self, texts):
        return self.tokenizer(texts, max_length=self.tokenizer.model_max_length, padding="max_length",
                              truncation=True, return_tensors="pt").input_ids.to(self.device)

    def _score_batch(self, pil_images, prompts):
        pix = self.image_processor(pil_images, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        ids = self._tokenize(prompts)
        cond = self._tokenize([self.condition]).repeat(len(prompts), 1)
        return self.model(pix, ids, cond, self.threshold).float()


def _clip_config(proc_dir: Path, explicit=None):
    from transformers import CLIPConfig

    path = Path(explicit) if explicit else proc_dir / "config.json"
    if path.is_file():
        try:
            return CLIPConfig.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError) as e:
            raise EPDError(f"{path}: not a CLIP config ({e})") from None
    return CLIPConfig.from_dict(VIT_H_14_CLIP_CONFIG)


def make_mps(weights_dir=None, device="cpu", paths=None, batch_size: int = 8, condition: str = OVERALL_CONDITION,
             threshold: float = 0.3, clip_config=None, precision: str = "fp32") -> MPSScorer:
    """Build MPS from ``mps/MPS_overall_state_dict.pt`` and the CLIP-ViT-H-14 processor folder ``mps/processor``.

    Args:
        weights_dir (`str`, *optional*): weights root tried first.
        device (`str`): torch device.
        paths (`dict`, *optional*): ``{"mps": state_dict file, "mps_processor": folder}``.
        batch_size (`int`): images per forward pass.
        condition (`str`): condition string (default: the released "overall" one).
        threshold (`float`): condition-mask threshold.
        clip_config (`str`, *optional*): CLIP ``config.json``; default ``<processor>/config.json``, else ViT-H-14.
        precision (`str`): ``"fp32"`` or ``"fp16"`` (CUDA).
    """
    from . import resolve_weights

    p = resolve_weights("mps", weights_dir, paths)
    sd = load_checkpoint(p["mps"], "MPS state_dict")
    if not isinstance(sd, dict):
        raise WrongWeightsError(f"{p['mps']}: not an MPS state_dict (got {type(sd).__name__})")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    try:
        cross = cross_dims_from_state_dict(sd)
    except WrongWeightsError as e:
        raise WrongWeightsError(f"{p['mps']}: {e}") from None
    from transformers import AutoTokenizer, CLIPImageProcessor

    model = MPSModel(_clip_config(Path(p["mps_processor"]), clip_config), cross)
    check_state_dict(model, sd, p["mps"], "MPS (CLIP-H + cross_model)")
    try:
        image_processor = CLIPImageProcessor.from_pretrained(str(p["mps_processor"]), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(p["mps_processor"]), local_files_only=True)
    except Exception as e:
        raise EPDError(f"{p['mps_processor']}: cannot load the CLIP processor for MPS ({type(e).__name__}: "
                       f"{str(e)[:300]})") from None
    scorer = MPSScorer(model, image_processor, tokenizer, batch_size, device, condition, threshold, precision)
    scorer.weights = {k: str(v) for k, v in p.items()}
    return scorer
