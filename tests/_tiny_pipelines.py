"""Tiny random diffusers components for the SD1.5, SD3 and FLUX adapter tests (no downloads).

Each ``tiny_*`` builder seeds torch with 0 and returns the modules an adapter's ``from_components`` takes, with the
offline tokenizers of :mod:`_tiny_tokenizers`; each ``*_pipe`` builds the matching diffusers pipeline around them
(for parity with the pipeline, and for ``save_pretrained`` folders that the adapters load through the weights
resolver). Shared by ``test_backbone_sd15.py``, ``test_backbone_sd3.py``, ``test_backbone_flux.py`` and
``test_backbone_contract.py``.
"""

from __future__ import annotations

import torch
from diffusers import (AutoencoderKL, DPMSolverMultistepScheduler, FluxPipeline, FluxTransformer2DModel,
                       SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPipeline, UNet2DConditionModel)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                          T5EncoderModel, T5TokenizerFast)

from _tiny_tokenizers import clip_tokenizer_dir, t5_tokenizer_dir

from epd.backbones.diffusers_common import CPU_ALIGNMENT

__all__ = ["tiny_sd15", "sd15_pipe", "tiny_sd3", "sd3_pipe", "tiny_flux", "flux_pipe", "FloatTimestepDPM", "rel",
           "misaligned"]


class FloatTimestepDPM(DPMSolverMultistepScheduler):
    """diffusers' DPM-Solver with flow sigmas casts its timesteps to int64, so the transformer is evaluated at
    ``floor(1000 t) / 1000`` while the update uses ``t`` (diffusers 0.39, ``set_timesteps``). This subclass keeps
    ``timesteps = 1000 t`` so that both sides evaluate the model at the grid's own times."""

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self.timesteps = self.sigmas[:-1] * self.config.num_train_timesteps


def rel(a, b):
    """Relative difference ``|a - b| / |b|``."""
    return ((a - b).norm() / b.norm()).item()


def misaligned(pipe):
    """Weights not on torch's 64-byte allocation boundary (e.g. views of a memory-mapped safetensors file)."""
    return [f"{c}.{n}" for c, m in pipe.components.items() if isinstance(m, torch.nn.Module)
            for n, t in (*m.named_parameters(), *m.named_buffers()) if t.data_ptr() % CPU_ALIGNMENT]


def _clip_tokenizer():
    return CLIPTokenizer.from_pretrained(clip_tokenizer_dir(), model_max_length=77)


# ---------------------------------------------------------------------- SD1.5
def tiny_sd15(cross_dim=32, sample_size=64):
    """``(unet, vae, text_encoder, tokenizer)``: VAE factor 2, UNet downsampling 2 (native ``2 * sample_size`` px)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=sample_size, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_dim,
                                norm_num_groups=2, attention_head_dim=2).eval()
    vae = AutoencoderKL(block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2).eval()
    te = CLIPTextModel(CLIPTextConfig(hidden_size=cross_dim, intermediate_size=16, num_attention_heads=2,
                                      num_hidden_layers=1 if cross_dim > 32 else 2, vocab_size=49408,
                                      max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                                      pad_token_id=49407)).eval()
    return unet, vae, te, _clip_tokenizer()


def sd15_pipe(parts, scheduler):
    unet, vae, te, tok = parts
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


# ---------------------------------------------------------------------- SD3
def _clip_projection():
    cfg = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                         vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407, projection_dim=32)
    return CLIPTextModelWithProjection(cfg).eval()


def _t5(t5tok):
    cfg = T5Config(d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2, vocab_size=len(t5tok))
    return T5EncoderModel(cfg).eval()


def tiny_sd3():
    """``(transformer, vae, (clip, clip, t5), (tok, tok, t5tok))``: VAE factor 8, patch 2 (multiples of 16 px)."""
    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                               num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                               pooled_projection_dim=64, out_channels=4, pos_embed_max_size=64).eval()
    vae = AutoencoderKL(block_out_channels=(4, 4, 4, 4), in_channels=3, out_channels=3, latent_channels=4,
                        norm_num_groups=2, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, shift_factor=0.0609, scaling_factor=1.5035).eval()
    t5tok = T5TokenizerFast.from_pretrained(t5_tokenizer_dir())
    t5 = _t5(t5tok)
    tok = _clip_tokenizer()
    return tr, vae, (_clip_projection(), _clip_projection(), t5), (tok, tok, t5tok)


def sd3_pipe(parts, scheduler):
    tr, vae, (t1, t2, t3), (k1, k2, k3) = parts
    return StableDiffusion3Pipeline(transformer=tr, scheduler=scheduler, vae=vae, text_encoder=t1, tokenizer=k1,
                                    text_encoder_2=t2, tokenizer_2=k2, text_encoder_3=t3, tokenizer_3=k3)


# ---------------------------------------------------------------------- FLUX
def tiny_flux(guidance_embeds=True):
    """``(transformer, vae, (clip, t5), (tok, t5tok))``: VAE factor 8, 2x2 packing (multiples of 16 px)."""
    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                axes_dims_rope=[4, 4, 8], guidance_embeds=guidance_embeds).eval()
    vae = AutoencoderKL(block_out_channels=(4, 4, 4, 4), in_channels=3, out_channels=3, latent_channels=16,
                        norm_num_groups=2, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, shift_factor=0.1159, scaling_factor=0.3611).eval()
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                        num_hidden_layers=2, vocab_size=49408, max_position_embeddings=77,
                                        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)).eval()
    t5tok = T5TokenizerFast.from_pretrained(t5_tokenizer_dir())
    t5 = _t5(t5tok)
    tok = _clip_tokenizer()
    return tr, vae, (clip, t5), (tok, t5tok)


def flux_pipe(parts, scheduler):
    tr, vae, (clip, t5), (tok, t5tok) = parts
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tok, text_encoder_2=t5,
                        tokenizer_2=t5tok, transformer=tr)
