"""``epd weights fake``: random-weight stand-ins for every backbone and scorer, in the weights resolver's layout.

No real weights can be downloaded on the CI and development machines, yet the product must run its real loading
and inference code end to end. This module writes files exactly where and how :mod:`epd.backbones.weights` and the
loaders read the released ones, filled with random values:

* backbones: diffusers folders of ``StableDiffusionPipeline`` (``sd15``), ``StableDiffusion3Pipeline``
  (``sd3-medium``) and ``FluxPipeline`` (``flux1-dev``), each with the release's scheduler config;
* scorers: HPSv2.1 (open_clip state dict), PickScore (transformers CLIP folder + processor), ImageReward
  (``ImageReward.pt`` + ``med_config.json`` + BERT tokenizer folder), OpenAI CLIP ViT-L/14 (state dict), the LAION
  aesthetic MLP, MPS (state dict + processor) and the FID Inception-v3 (pytorch-fid layout).

Two sizes: ``tiny`` (a few MB per model; CPU tests of the real code paths) and ``full`` (the released architectures,
random bfloat16, for memory and latency on a GPU machine; SD3 and FLUX each need tens of GB of disk). Full size is
built one component at a time: each module is created with its parameters on the meta device (no memory, no
initialisation), then every parameter gets a fresh tensor filled from its own seeded generator, in parallel
threads, the component is saved and freed before the next one is built.

Random values: every parameter is filled from ``torch.Generator().manual_seed(h)`` with ``h`` a hash of the seed,
the item, the component and the parameter name, so files are byte-identical for one seed on any machine and thread
count. Biases are 0, 1-d ``weight`` (norm scales) 1, matrices uniform with standard deviation ``1/sqrt(fan_in)``,
other tensors uniform with standard deviation 0.02; buffers keep their constructed values.

Tokenizers (:mod:`epd.tiny_tokenizers`): CLIP is exact (rebuilt from open_clip's BPE file), except that the tiny
backbones keep only its first 1000 merges (a 1514-token vocabulary: SD1.5's text encoder must stay 768 wide for the
adapter, and a 49408 x 768 embedding alone would be 150 MB); T5 is a sentencepiece stand-in trained here (32000
pieces + 100 extra ids at full size, like the release); BERT (ImageReward) is a small stand-in vocabulary.

``fake_weights.json`` in the root records what was written (size, seed, parameter counts, bytes, package versions)
and states that these are random weights.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .backbones.weights import REGISTRY
from .errors import ConfigError, EPDError
from .io import atomic_path, atomic_write_json, read_json

__all__ = ["SIZES", "BACKBONES", "SCORERS", "MANIFEST", "NOTICE", "Part", "backbone_parts", "random_tensor",
           "materialise", "build_empty", "count_parameters", "planned_paths", "write_fake_weights",
           "add_arguments", "run"]

SIZES = ("tiny", "full")
BACKBONES = ("sd15", "sd3", "flux")
SCORERS = ("hps", "pickscore", "imagereward", "clip", "aesthetic", "mps", "fid")
MANIFEST = "fake_weights.json"
NOTICE = ("RANDOM WEIGHTS, NOT THE RELEASED ONES. Every item listed here was written by `epd weights fake`: the "
          "released file layout and architecture filled with random values, so that the real loading and inference "
          "code runs. Images, scores and timings of quality made with them mean nothing; replace them with the "
          "released weights for any real result.")
# Registry entries (epd.backbones.weights) each item writes.
TARGETS: dict[str, tuple[tuple[str, str], ...]] = {
    "sd15": (("backbone", "sd15"),),
    "sd3": (("backbone", "sd3"),),
    "flux": (("backbone", "flux"),),
    "hps": (("scorer", "hps"),),
    "pickscore": (("scorer", "pickscore"), ("scorer", "pickscore_processor")),
    "imagereward": (("scorer", "imagereward"), ("scorer", "imagereward_med_config"), ("scorer", "imagereward_bert")),
    "clip": (("scorer", "clip_l14"),),
    "aesthetic": (("scorer", "aesthetic"),),
    "mps": (("scorer", "mps"), ("scorer", "mps_processor")),
    "fid": (("scorer", "inception"),),
}
# Files an item writes or removes besides its registry entries (the tiny HPS architecture; a full-size HPS run
# removes a stale one, which would otherwise make the loader build the tiny model).
EXTRA_PATHS = {"hps": ("hps/open_clip_config.json",)}
DTYPES = {"tiny": torch.float32, "full": torch.bfloat16}
T5_VOCAB = {"tiny": 1152, "full": 32128}  # model rows: (sentencepiece pieces + 100 extra ids) rounded up to 128
TINY_MERGES = 1000  # BPE merges kept by the tiny backbones' CLIP tokenizers
CLIP_VOCAB = {"tiny": 512 + TINY_MERGES + 2, "full": 49408}  # byte tokens (plain and </w>), merges, 2 specials


# ---------------------------------------------------------------------- random parameters
def _tensor_seed(seed: int, key: str) -> int:
    """A 63-bit generator seed from the run seed and a tensor's full name."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "little") >> 1


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int, key: str) -> torch.Tensor:
    """A freshly allocated random tensor for the parameter named ``key`` (``<item>/<component>/<param name>``).

    Biases are 0 and 1-d ``weight`` tensors (norm scales) 1; matrices and convolution kernels are uniform with
    standard deviation ``1/sqrt(fan_in)``; other tensors (embeddings vectors, scalars) uniform with standard
    deviation 0.02. The values depend on ``seed`` and ``key`` only (their own generator).

    Args:
        shape (`tuple`): tensor shape.
        dtype (`torch.dtype`): tensor dtype (filled directly in it: no float32 copy for bfloat16).
        seed (`int`): the run seed.
        key (`str`): a unique name of the tensor.
    """
    leaf = key.rsplit(".", 1)[-1]
    t = torch.empty(shape, dtype=dtype)
    if leaf.endswith("bias"):
        return t.zero_()
    if len(shape) == 1 and leaf == "weight":
        return t.fill_(1)
    std = 1 / math.sqrt(max(math.prod(shape[1:]), 1)) if len(shape) >= 2 else 0.02
    bound = math.sqrt(3) * std
    return t.uniform_(-bound, bound, generator=torch.Generator().manual_seed(_tensor_seed(seed, key)))


def build_empty(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Call ``factory`` with parameters created on the meta device (no memory, no initialisation); buffers are
    real (e.g. positional tables computed by the constructor)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return factory()


def materialise(module: torch.nn.Module, seed: int, key: str, dtype: torch.dtype, workers: int | None = None) -> int:
    """Give every parameter of ``module`` (built by :func:`build_empty`) a new random CPU tensor in ``dtype``
    (:func:`random_tensor`, filled in ``workers`` threads) and cast floating buffers to ``dtype``. Tied
    parameters stay tied.

    Returns:
        `int`: the number of parameters.
    """
    params = dict(module.named_parameters())  # one name per tensor (tied ones once)

    def make(item):
        name, p = item
        return name, torch.nn.Parameter(random_tensor(tuple(p.shape), dtype, seed, f"{key}/{name}"),
                                        requires_grad=False)

    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as ex:
        fresh = dict(ex.map(make, params.items()))
    by_id = {id(p): fresh[name] for name, p in params.items()}
    for mod in module.modules():
        for pname, p in list(mod._parameters.items()):
            if p is not None and id(p) in by_id:
                mod._parameters[pname] = by_id[id(p)]
        for bname, b in list(mod._buffers.items()):
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                mod._buffers[bname] = b.to(dtype)
    return sum(p.numel() for p in fresh.values())


def count_parameters(factory: Callable[[], torch.nn.Module]) -> int:
    """Parameter count of the module ``factory`` builds, without allocating it (meta device)."""
    return sum(p.numel() for p in build_empty(factory).parameters())


# ---------------------------------------------------------------------- component configs
def _diffusers(cls: str, **cfg) -> Callable[[], torch.nn.Module]:
    def build():
        import diffusers

        return getattr(diffusers, cls)(**cfg)

    return build


def _transformers(cls: str, config_cls: str, **cfg) -> Callable[[], torch.nn.Module]:
    def build():
        import transformers

        return getattr(transformers, cls)(getattr(transformers, config_cls)(**cfg))

    return build


def _vae(size: str, latent_channels: int, scaling: float, shift: float | None, sample_size: int):
    """AutoencoderKL: the SD/SD3/FLUX VAE (128-256-512-512, 8x down) or a tiny one with the same 8x factor."""
    quant = latent_channels == 4  # SD1.5's VAE has the quant convs; SD3's and FLUX's 16-channel VAEs do not
    blocks = (128, 256, 512, 512) if size == "full" else (4, 4, 4, 4)
    return _diffusers("AutoencoderKL", in_channels=3, out_channels=3, latent_channels=latent_channels,
                      block_out_channels=blocks, layers_per_block=2 if size == "full" else 1,
                      norm_num_groups=32 if size == "full" else 2, down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4, sample_size=sample_size, scaling_factor=scaling,
                      shift_factor=shift, use_quant_conv=quant, use_post_quant_conv=quant)


def _clip_text(size: str, which: str, with_projection: bool) -> Callable[[], torch.nn.Module]:
    """CLIP text encoders as the releases configure them: ``L`` (OpenAI ViT-L/14 text, quick-GELU) or ``G``
    (OpenCLIP bigG/14 text, GELU). Tiny: the same classes over the small-vocabulary tokenizer, 16 (``L``) or 32
    (``G``) wide; ``L768`` is a one-layer 768-wide ``L`` for SD1.5, whose adapter requires the UNet's 768-wide
    cross-attention (the SD1.5 signature)."""
    if size == "full":
        dims = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                    projection_dim=768, hidden_act="quick_gelu") if which.startswith("L") else \
            dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                 projection_dim=1280, hidden_act="gelu")
    else:
        w = {"L": 16, "G": 32, "L768": 768}[which]
        dims = dict(hidden_size=w, intermediate_size=32, num_attention_heads=2 if w < 64 else w // 64,
                    num_hidden_layers=1 if w > 64 else 2, projection_dim=w,
                    hidden_act="gelu" if which == "G" else "quick_gelu")
    cls = "CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"
    return _transformers(cls, "CLIPTextConfig", vocab_size=CLIP_VOCAB[size], max_position_embeddings=77,
                         layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1, **dims)


def _t5(size: str, vocab: int) -> Callable[[], torch.nn.Module]:
    """T5 v1.1 XXL encoder (google/t5-v1_1-xxl as the SD3/FLUX releases ship it) or a tiny one."""
    dims = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24) if size == "full" else \
        dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2)
    return _transformers("T5EncoderModel", "T5Config", vocab_size=vocab, feed_forward_proj="gated-gelu",
                         relative_attention_num_buckets=32, relative_attention_max_distance=128,
                         layer_norm_epsilon=1e-6, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                         decoder_start_token_id=0, **dims)


# Scheduler configs of the releases (the scheduler/scheduler_config.json of each model repository).
SCHEDULERS = {
    "sd15": ("PNDMScheduler", {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                               "beta_schedule": "scaled_linear", "trained_betas": None, "set_alpha_to_one": False,
                               "steps_offset": 1, "skip_prk_steps": True, "clip_sample": False,
                               "prediction_type": "epsilon"}),
    "sd3": ("FlowMatchEulerDiscreteScheduler", {"num_train_timesteps": 1000, "shift": 3.0}),
    "flux": ("FlowMatchEulerDiscreteScheduler", {"num_train_timesteps": 1000, "shift": 3.0,
                                                 "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                                                 "base_image_seq_len": 256, "max_image_seq_len": 4096}),
}


# ---------------------------------------------------------------------- backbones
@dataclass(frozen=True)
class Part:
    """One component of a diffusers pipeline folder.

    Args:
        name (`str`): the subfolder (``unet``, ``text_encoder_2``, ...).
        kind (`str`): ``"model"`` (``build()`` is called under :func:`build_empty`), ``"tokenizer"``
            (``build(tmp_dir)``) or ``"scheduler"`` (``build()``).
        build (`callable`): constructs the component.
    """

    name: str
    kind: str
    build: Callable = field(repr=False)


def _scheduler(name: str) -> Callable:
    cls, cfg = SCHEDULERS[name]

    def build():
        import diffusers

        return getattr(diffusers, cls).from_config(cfg)

    return build


def _clip_tokenizer(size: str, pad_token: str | None = None) -> Callable:
    """The exact CLIP BPE tokenizer at full size; at tiny size the same tokenizer keeping its first
    :data:`TINY_MERGES` merges (``pad_token="!"`` for SD3's second, OpenCLIP bigG, tokenizer, as released)."""
    def build(tmp: Path):
        from transformers import CLIPTokenizer

        from .tiny_tokenizers import build_clip_tokenizer

        kw = {"pad_token": pad_token} if pad_token else {}
        merges = TINY_MERGES if size == "tiny" else None
        return CLIPTokenizer.from_pretrained(str(build_clip_tokenizer(tmp / "clip", merges)), model_max_length=77,
                                             local_files_only=True, **kw)

    return build


def _t5_tokenizer(size: str) -> Callable:
    """A sentencepiece stand-in for the T5 v1.1 tokenizer: 32000 pieces + 100 extra ids at full size."""
    def build(tmp: Path):
        from transformers import T5TokenizerFast

        from .tiny_tokenizers import build_t5_tokenizer

        n = 32000 if size == "full" else 1000
        return T5TokenizerFast.from_pretrained(str(build_t5_tokenizer(tmp / "t5", n, 100, exact=size == "full")),
                                               local_files_only=True)

    return build


def _sd15_parts(size: str) -> list[Part]:
    if size == "full":  # stable-diffusion-v1-5/unet/config.json
        unet = _diffusers("UNet2DConditionModel", sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                          block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                          down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                          up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32)
    else:
        unet = _diffusers("UNet2DConditionModel", sample_size=64, in_channels=4, out_channels=4, layers_per_block=1,
                          block_out_channels=(4, 8), cross_attention_dim=768, attention_head_dim=2,
                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=2)
    return [Part("unet", "model", unet), Part("vae", "model", _vae(size, 4, 0.18215, None, 512)),
            Part("text_encoder", "model", _clip_text(size, "L768", False)),
            Part("tokenizer", "tokenizer", _clip_tokenizer(size)), Part("scheduler", "scheduler", _scheduler("sd15"))]


def _sd3_parts(size: str) -> list[Part]:
    if size == "full":  # stabilityai/stable-diffusion-3-medium-diffusers/transformer/config.json
        dims = dict(sample_size=128, num_layers=24, attention_head_dim=64, num_attention_heads=24,
                    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
                    pos_embed_max_size=192)
    else:  # pooled = 16 + 32 (the two tiny CLIPs), joint = the tiny T5's width
        dims = dict(sample_size=64, num_layers=1, attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                    caption_projection_dim=32, pooled_projection_dim=48, pos_embed_max_size=64)
    tr = _diffusers("SD3Transformer2DModel", patch_size=2, in_channels=16, out_channels=16, **dims)
    return [Part("transformer", "model", tr),
            Part("vae", "model", _vae(size, 16, 1.5305, 0.0609, 1024 if size == "full" else 512)),
            Part("text_encoder", "model", _clip_text(size, "L", True)),
            Part("tokenizer", "tokenizer", _clip_tokenizer(size)),
            Part("text_encoder_2", "model", _clip_text(size, "G", True)),
            Part("tokenizer_2", "tokenizer", _clip_tokenizer(size, pad_token="!")),
            Part("text_encoder_3", "model", _t5(size, T5_VOCAB[size])),
            Part("tokenizer_3", "tokenizer", _t5_tokenizer(size)), Part("scheduler", "scheduler", _scheduler("sd3"))]


def _flux_parts(size: str) -> list[Part]:
    if size == "full":  # black-forest-labs/FLUX.1-dev/transformer/config.json
        dims = dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                    joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
    else:  # pooled = the tiny CLIP-L's width, joint = the tiny T5's width, rope axes sum to the head width
        dims = dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                    joint_attention_dim=64, pooled_projection_dim=16, axes_dims_rope=(4, 4, 8))
    tr = _diffusers("FluxTransformer2DModel", patch_size=1, in_channels=64, guidance_embeds=True, **dims)
    return [Part("transformer", "model", tr),
            Part("vae", "model", _vae(size, 16, 0.3611, 0.1159, 1024 if size == "full" else 512)),
            Part("text_encoder", "model", _clip_text(size, "L", False)),
            Part("tokenizer", "tokenizer", _clip_tokenizer(size)),
            Part("text_encoder_2", "model", _t5(size, T5_VOCAB[size])),
            Part("tokenizer_2", "tokenizer", _t5_tokenizer(size)), Part("scheduler", "scheduler", _scheduler("flux"))]


PIPELINES = {
    "sd15": ("StableDiffusionPipeline", _sd15_parts,
             {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}),
    "sd3": ("StableDiffusion3Pipeline", _sd3_parts, {}),
    "flux": ("FluxPipeline", _flux_parts, {}),
}


def backbone_parts(name: str, size: str) -> tuple[str, list[Part], dict]:
    """``(pipeline class name, components, other constructor arguments)`` of backbone ``name`` at ``size``."""
    cls, parts, extra = PIPELINES[name]
    return cls, parts(size), extra


def _save_part(part: Part, out: Path, seed: int, key: str, dtype: torch.dtype, workers: int | None):
    """Build, fill and save one component into ``out``; free it.

    Returns:
        `(object, int)`: what the pipeline constructor needs for ``model_index.json`` (a meta-device twin for a
        model) and the parameter count (0 for tokenizers and schedulers).
    """
    if part.kind == "model":
        module = build_empty(part.build)
        n = materialise(module, seed, key, dtype, workers)
        module.save_pretrained(str(out), safe_serialization=True)
        del module
        if n > 10**8:  # give a big model's memory back before the next one (a full collection costs ~1 s)
            gc.collect()
        return build_empty(part.build), n
    if part.kind == "tokenizer":
        with tempfile.TemporaryDirectory(prefix="epd_fake_tok_") as tmp:
            tok = part.build(Path(tmp))
            tok.save_pretrained(str(out))  # while its source files exist (T5 copies spiece.model)
        return tok, 0
    sched = part.build()
    sched.save_pretrained(str(out))
    return sched, 0


def write_backbone(name: str, root: Path, size: str, seed: int, workers: int | None = None) -> dict:
    """Write backbone ``name`` as a diffusers folder at its registry path under ``root``, component by component
    (each saved with its own ``save_pretrained`` and freed before the next is built; ``model_index.json`` from the
    pipeline class over meta-device twins: the same files ``<Pipeline>.save_pretrained`` writes).

    Returns:
        `dict`: the manifest record (files, parameters per component, dtype).
    """
    import diffusers

    cls, parts, extra = backbone_parts(name, size)
    rel = REGISTRY[("backbone", name)].rel
    dtype = DTYPES[size]
    params, index = {}, {}
    with _staged_dir(root / rel) as tmp:
        for part in parts:
            t0 = time.time()
            index[part.name], n = _save_part(part, tmp / part.name, seed, f"{name}/{part.name}", dtype, workers)
            if n:
                params[part.name] = n
                _log(size, f"  {name}/{part.name}: {n / 1e6:.1f}M parameters, {time.time() - t0:.1f} s")
        getattr(diffusers, cls)(**index, **extra).save_config(str(tmp))
    return {"files": [rel], "params": params, "dtype": _name(dtype)}


# ---------------------------------------------------------------------- scorers
# open_clip local-folder config of the tiny HPS model (``hps/open_clip_config.json``; read by epd.rewards.hps).
HPS_TINY = {"embed_dim": 16,
            "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "patch_size": 32, "head_width": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1}}
# clip.model.CLIP arguments: OpenAI ViT-L/14 (what clip.model.build_model infers from ViT-L-14.pt) and a tiny one
# (widths of 64: the clip package gives every 64 channels one attention head).
OPENAI_CLIP = {
    "full": dict(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024, vision_patch_size=14,
                 context_length=77, vocab_size=49408, transformer_width=768, transformer_heads=12,
                 transformer_layers=12),
    "tiny": dict(embed_dim=16, image_resolution=224, vision_layers=1, vision_width=64, vision_patch_size=32,
                 context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1),
}
# BLIP med_config.json of ImageReward-v1.0 (BERT-base with cross-attention; encoder_width is replaced by the ViT
# width when the model is built) and a tiny one.
IMAGEREWARD_MED = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524, "encoder_width": 768,
    "add_cross_attention": True,
}
IMAGEREWARD_MED_TINY = {"hidden_size": 32, "intermediate_size": 64, "max_position_embeddings": 40,
                        "num_attention_heads": 2, "num_hidden_layers": 1, "encoder_width": 64}
IMAGEREWARD_VIT = {"full": dict(embed_dim=1024, depth=24, patch_size=16, img_size=224, num_heads=16, mlp_ratio=4.0),
                   "tiny": dict(embed_dim=64, depth=1, patch_size=16, img_size=224, num_heads=1, mlp_ratio=4.0)}
MPS_CROSS = {"full": dict(dim=1024, layer_num=4, dim_head=64, heads=16, ff_mult=4),
             "tiny": dict(dim=16, layer_num=1, dim_head=8, heads=2, ff_mult=2)}


def _clip_model_config(size: str) -> dict:
    """transformers ``CLIPConfig`` of laion CLIP-ViT-H-14 (PickScore_v1 and MPS are fine-tuned from it) or a tiny
    one (projection 16, text width 16, vision width 32)."""
    if size == "full":
        from .rewards.mps import VIT_H_14_CLIP_CONFIG

        return VIT_H_14_CLIP_CONFIG
    return {"projection_dim": 16,
            "text_config": dict(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, max_position_embeddings=77),
            "vision_config": dict(image_size=224, patch_size=32, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=2)}


def _rel(name: str) -> str:
    return REGISTRY[("scorer", name)].rel


def _save_torch(path: Path, obj) -> None:
    """``torch.save`` through a temporary file (into an open file: the archive's inner name is then the fixed
    ``archive``, not the temporary file's name, so equal contents give equal bytes)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def _filled(factory: Callable, seed: int, key: str, dtype: torch.dtype, workers: int | None):
    module = build_empty(factory)
    return module, materialise(module, seed, key, dtype, workers)


def write_hps(root: Path, size: str, seed: int, workers: int | None = None) -> dict:
    """HPSv2.1: ``{"state_dict": ...}`` of an open_clip model (ViT-H-14, or tiny with its ``open_clip_config.json``
    beside it; a full-size run removes a stale one)."""
    import open_clip

    cfg = HPS_TINY if size == "tiny" else open_clip.get_model_config("ViT-H-14")
    model, n = _filled(lambda: open_clip.CLIP(**cfg), seed, "hps/model", DTYPES[size], workers)
    conf = root / EXTRA_PATHS["hps"][0]
    if size == "tiny":
        from .tiny_tokenizers import CLIP_MEAN, CLIP_STD

        atomic_write_json(conf, {"model_cfg": cfg, "preprocess_cfg": {
            "mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic", "resize_mode": "shortest"}})
    else:
        conf.unlink(missing_ok=True)
    _save_torch(root / _rel("hps"), {"state_dict": model.state_dict()})
    files = [_rel("hps")] + ([EXTRA_PATHS["hps"][0]] if size == "tiny" else [])
    return {"files": files, "params": {"model": n}, "dtype": _name(DTYPES[size])}


def write_pickscore(root: Path, size: str, seed: int, workers: int | None = None) -> dict:
    """PickScore_v1: a transformers ``CLIPModel`` folder and a ``CLIPProcessor`` folder."""
    from transformers import CLIPConfig, CLIPModel

    from .tiny_tokenizers import build_clip_processor

    cfg = CLIPConfig(**_clip_model_config(size))
    model, n = _filled(lambda: CLIPModel(cfg), seed, "pickscore/model", DTYPES[size], workers)
    with _staged_dir(root / _rel("pickscore")) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
    with _staged_dir(root / _rel("pickscore_processor")) as tmp:
        build_clip_processor(tmp, 224)
    return {"files": [_rel("pickscore"), _rel("pickscore_processor")], "params": {"model": n},
            "dtype": _name(DTYPES[size])}


def write_mps(root: Path, size: str, seed: int, workers: int | None = None) -> dict:
    """MPS: the state dict of :class:`epd.rewards.mps.MPSModel` (CLIP-H + cross model) and a processor folder
    whose ``config.json`` is the CLIP config (as in the laion CLIP-H folder; the loader builds from it)."""
    from transformers import CLIPConfig

    from .rewards.mps import MPSModel
    from .tiny_tokenizers import build_clip_processor

    cfg = CLIPConfig(**_clip_model_config(size))
    model, n = _filled(lambda: MPSModel(cfg, MPS_CROSS[size]), seed, "mps/model", DTYPES[size], workers)
    _save_torch(root / _rel("mps"), model.state_dict())
    with _staged_dir(root / _rel("mps_processor")) as tmp:
        build_clip_processor(tmp, 224)
        cfg.to_json_file(str(tmp / "config.json"))
    return {"files": [_rel("mps"), _rel("mps_processor")], "params": {"model": n}, "dtype": _name(DTYPES[size])}


def write_imagereward(root: Path, size: str, seed: int, workers: int | None = None) -> dict:
    """ImageReward: ``ImageReward.pt`` (state dict of the package's model), ``med_config.json`` and a BERT
    tokenizer folder (a small stand-in vocabulary: the real bert-base-uncased vocab ships with no package)."""
    import warnings

    from transformers import BertTokenizer

    from .rewards.imagereward import build_imagereward_model
    from .tiny_tokenizers import build_bert_vocab

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the package imports clip, which imports the deprecated pkg_resources
        import ImageReward.ImageReward  # noqa: F401

    med = dict(IMAGEREWARD_MED, **(IMAGEREWARD_MED_TINY if size == "tiny" else {}))
    with _staged_dir(root / _rel("imagereward_bert")) as bert, tempfile.TemporaryDirectory() as tmp:
        build_bert_vocab(bert)
        if size == "tiny":  # room for the vocabulary and BLIP's [DEC]/[ENC] tokens
            med["vocab_size"] = -(-(len(BertTokenizer.from_pretrained(str(bert), local_files_only=True)) + 2) // 8) * 8
        (Path(tmp) / "med_config.json").write_text(json.dumps(med, indent=2) + "\n")
        model, n = _filled(lambda: build_imagereward_model(Path(tmp) / "med_config.json", bert,
                                                           IMAGEREWARD_VIT[size], med["hidden_size"]),
                           seed, "imagereward/model", DTYPES[size], workers)
    atomic_write_json(root / _rel("imagereward_med_config"), med)
    _save_torch(root / _rel("imagereward"), model.state_dict())
    return {"files": [_rel("imagereward"), _rel("imagereward_med_config"), _rel("imagereward_bert")],
            "params": {"model": n}, "dtype": _name(DTYPES[size])}


def _openai_clip_module():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # clip imports the deprecated pkg_resources
        import clip.model

    return clip.model


def write_clip(root: Path, size: str, seed: int, workers: int | None = None) -> dict:
    """OpenAI CLIP ViT-L/14: a float16 state dict (the release's precision) whose shapes ``build_model`` reads."""
    cm = _openai_clip_module()
    model, n = _filled(lambda: cm.CLIP(**OPENAI_CLIP[size]), seed, "clip/model", torch.float16, workers)
    _save_torch(root / _rel("clip_l14"), model.state_dict())
    return {"files": [_rel("clip_l14")], "params": {"model": n}, "dtype": "float16"}


def write_aesthetic(root: Path, size: str, seed: int, workers: int | None = None) -> dict:
    """LAION aesthetic MLP over the CLIP image embedding (768 wide for ViT-L/14; the tiny CLIP's 16 at tiny size)."""
    from .rewards.aesthetic import AestheticMLP

    width = OPENAI_CLIP[size]["embed_dim"]
    mlp, n = _filled(lambda: AestheticMLP(width), seed, "aesthetic/mlp", torch.float32, workers)
    _save_torch(root / _rel("aesthetic"), mlp.state_dict())
    return {"files": [_rel("aesthetic")], "params": {"mlp": n}, "dtype": "float32"}


def write_fid(root: Path, size: str, seed: int, workers: int | None = None) -> dict:
    """FID Inception-v3 in the pytorch-fid layout, float32, at full size for both sizes (the loader builds the
    fixed architecture; about 95 MB)."""
    from .metrics.inception import FIDInceptionV3

    net, n = _filled(lambda: FIDInceptionV3().net, seed, "fid/inception", torch.float32, workers)
    sd = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    _save_torch(root / _rel("inception"), sd)
    return {"files": [_rel("inception")], "params": {"inception": n}, "dtype": "float32"}


WRITERS: dict[str, Callable[..., dict]] = {
    "hps": write_hps, "pickscore": write_pickscore, "imagereward": write_imagereward, "clip": write_clip,
    "aesthetic": write_aesthetic, "mps": write_mps, "fid": write_fid,
}


# ---------------------------------------------------------------------- files, manifest, command
_LOG = logging.getLogger(__name__)


def _log(size: str, msg: str) -> None:
    """Per-component progress: shown at full size (minutes per backbone), debug-level at tiny size."""
    _LOG.log(logging.INFO if size == "full" else logging.DEBUG, msg)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def _staged_dir(final: Path):
    """Yield an empty folder ``.tmp-<name>`` beside ``final``; when the block succeeds, move it onto ``final``
    (an existing ``final`` is first renamed aside, then deleted). On failure the temporary folder is removed and
    ``final`` is untouched."""
    tmp, old = final.parent / f".tmp-{final.name}", final.parent / f".old-{final.name}"
    _remove(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove(old)
    if final.exists() or final.is_symlink():
        os.replace(final, old)
    os.replace(tmp, final)
    _remove(old)


def planned_paths(items: list[str]) -> list[str]:
    """Paths (relative to the root) that writing ``items`` creates or replaces."""
    out = []
    for item in items:
        out += [REGISTRY[key].rel for key in TARGETS[item]] + list(EXTRA_PATHS.get(item, ()))
    return out


def _bytes(root: Path, files: list[str]) -> int:
    total = 0
    for rel in files:
        p = root / rel
        total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    return total


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for dist in ("epd", "torch", "diffusers", "transformers", "open_clip_torch", "image-reward", "clip-anytorch",
                 "sentencepiece", "safetensors"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _earlier_items(root: Path) -> dict[str, dict]:
    """Items of an existing ``<root>/fake_weights.json`` (read before anything is written: an unreadable one stops
    the run at once, naming it)."""
    path = root / MANIFEST
    old = read_json(path) if path.is_file() else {}
    return dict(old.get("items", {})) if isinstance(old, dict) and old.get("random_weights") else {}


def _write_manifest(root: Path, items: dict[str, dict]) -> Path:
    """Write ``<root>/fake_weights.json`` listing ``items`` (earlier ones included)."""
    path = root / MANIFEST
    atomic_write_json(path, {"notice": NOTICE, "random_weights": True, "written_by": "epd weights fake",
                             "versions": _versions(), "items": dict(sorted(items.items()))})
    return path


# Approximate bytes written per item at full size (bfloat16 weights; CLIP float16, FID float32, as released).
FULL_BYTES = {"sd15": 2.1e9, "sd3": 15.4e9, "flux": 33.8e9, "hps": 2.0e9, "pickscore": 2.0e9, "imagereward": 0.9e9,
              "clip": 0.86e9, "aesthetic": 3.5e6, "mps": 2.2e9, "fid": 96e6}


def _check_space(root: Path, items: list[str], size: str) -> None:
    """Stop before writing when the file system of ``root`` cannot hold the full-size items (a half-written
    30 GB folder helps nobody)."""
    if size != "full":
        return
    need = sum(FULL_BYTES[i] for i in items) * 1.02
    free = shutil.disk_usage(root).free
    if free < need:
        raise EPDError(f"{root}: about {need / 1e9:.1f} GB needed for {', '.join(items)} at full size, "
                       f"{free / 1e9:.1f} GB free; write fewer items at a time (--backbones/--scorers) or elsewhere")


def _check_names(kind: str, names, known: tuple[str, ...]) -> list[str]:
    names = list(names)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"--{kind}: unknown {', '.join(map(repr, unknown))}; accepted: {', '.join(known)}")
    return list(dict.fromkeys(names))


def write_fake_weights(root: str | os.PathLike, size: str, backbones=BACKBONES, scorers=SCORERS, seed: int = 0,
                       force: bool = False, workers: int | None = None, log: Callable[[str], None] = print) -> dict:
    """Write random-weight stand-ins into ``root`` with the weights resolver's relative paths.

    Args:
        root (`str` or `Path`): the weights root (``EPD_WEIGHTS_DIR``); created if missing.
        size (`str`): ``"tiny"`` or ``"full"``.
        backbones (`list[str]`): among :data:`BACKBONES`.
        scorers (`list[str]`): among :data:`SCORERS` (``aesthetic`` loads with the ``clip`` model of the same size).
        seed (`int`): the random seed (same seed: byte-identical files).
        force (`bool`): replace existing files and folders (otherwise refuse before writing anything).
        workers (`int`, *optional*): threads filling tensors (default: the CPU count).
        log (`callable`): receives one line per item written.

    Returns:
        `dict`: item -> manifest record (``size``, ``seed``, ``files``, ``params``, ``total_params``, ``bytes``).

    Raises:
        EPDError: an output already exists and ``force`` is false (naming it), or an unknown size or name.
    """
    if size not in SIZES:
        raise ConfigError(f"--size: expected one of {', '.join(SIZES)}, got {size!r}")
    items = _check_names("backbones", backbones, BACKBONES) + _check_names("scorers", scorers, SCORERS)
    if not items:
        raise ConfigError("nothing to write: --backbones and --scorers are both empty")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers: expected a positive number of threads, got {workers}")
    root = Path(root)
    existing = [rel for rel in planned_paths(items) if (root / rel).exists() or (root / rel).is_symlink()]
    if existing and not force:
        more = f" (and {len(existing) - 1} more: {', '.join(existing[1:])})" if len(existing) > 1 else ""
        raise EPDError(f"{root / existing[0]} already exists{more}; nothing was written (pass --force to replace "
                       "with random weights)")
    earlier = _earlier_items(root)
    root.mkdir(parents=True, exist_ok=True)
    _check_space(root, items, size)
    records = {}
    for item in items:
        t0 = time.time()
        rec = write_backbone(item, root, size, seed, workers) if item in BACKBONES else \
            WRITERS[item](root, size, seed, workers)
        rec = {"size": size, "seed": seed, **rec, "total_params": sum(rec["params"].values())}
        rec["bytes"] = _bytes(root, rec["files"])
        records[item] = rec
        _write_manifest(root, {**earlier, **records})  # after each item: an interrupted run's files are marked too
        log(f"{item}: {rec['total_params'] / 1e6:.1f}M random parameters ({rec['dtype']}), "
            f"{rec['bytes'] / 1e6:.1f} MB in {', '.join(rec['files'])} ({time.time() - t0:.1f} s)")
    return records


def _names(text: str) -> list[str]:
    return [] if text.strip().lower() in ("", "none") else [n.strip() for n in text.split(",") if n.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Write RANDOM-weight stand-ins of the backbones and scorers in the weights resolver's layout "
                     "(point EPD_WEIGHTS_DIR at --out): the real loaders and inference code run, results mean "
                     "nothing. tiny: a few MB per model, for CPU tests; full: the released architectures in "
                     "bfloat16, for memory/latency on a GPU machine (tens of GB).")
    p.add_argument("--out", required=True, type=Path, help="weights root to write into (created if missing)")
    p.add_argument("--size", required=True, choices=SIZES, help="tiny models or the released architectures")
    p.add_argument("--backbones", type=_names, default=list(BACKBONES),
                   help=f"comma-separated among {','.join(BACKBONES)}, or none (default: all)")
    p.add_argument("--scorers", type=_names, default=list(SCORERS),
                   help=f"comma-separated among {','.join(SCORERS)}, or none (default: all)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes identical files")
    p.add_argument("--force", action="store_true", help="replace existing files and folders")
    p.add_argument("--workers", type=int, default=None, help="threads filling tensors (default: CPU count)")


def run(args: argparse.Namespace) -> int:
    t0 = time.time()
    records = write_fake_weights(args.out, args.size, args.backbones, args.scorers, args.seed, args.force,
                                 args.workers, log=lambda line: print(line, flush=True))
    total = sum(r["bytes"] for r in records.values())
    print(f"wrote {len(records)} random-weight item(s), {total / 1e6:.1f} MB, into {args.out} "
          f"({time.time() - t0:.1f} s); manifest {Path(args.out) / MANIFEST}. Use: EPD_WEIGHTS_DIR={args.out}")
    return 0
