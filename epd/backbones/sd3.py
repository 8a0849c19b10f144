"""Stable Diffusion 3 (Medium) through diffusers (SD3Transformer2DModel + AutoencoderKL + 2x CLIP + T5).

A rectified-flow velocity model ``x_t = (1 - t) x0 + t eps``. The transformer takes ``timestep = 1000 t``;
classifier-free guidance ``v_u + g (v_c - v_u)`` (``g = 4.5``, negative prompt ``""``) runs in one doubled
batch (spec §3.4, §7.2). Coordinates (:class:`~epd.backbones.diffusers_common.FlowDenoiser`): ``"flow"``
(native ``t``, the original's and the default) or ``"edm"`` (``sigma = t / (1 - t)``). Grids
(:mod:`epd.flow_schedules`): ``flowmatch`` (original), ``flowmatch_official`` (pipeline),
``flowmatch_dpm`` (diffusers' DPM-Solver flow grid). Latents ``16 x (res/8)^2``; decode
``x / scaling_factor + shift_factor``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..denoiser import Prepared
from ..errors import ConfigError
from ..flow_schedules import FLOW_SCHEDULES, flow_to_edm, sd3_sigmas
from .diffusers_common import (DiffusersBackbone, FlowDenoiser, check_prompts, default_flow_schedule, table_value,
                               warn_truncation)
from .diffusers_settings import DiffusersSettings

__all__ = ["SD3Denoiser", "SD3Backbone", "SD3Settings", "load", "check", "LAYOUT", "SCHEDULER_CONFIG", "RESOLUTIONS"]

RESOLUTIONS = (512, 1024)  # what the original supports and SD3-Medium was trained for
# stabilityai/stable-diffusion-3-medium-diffusers/scheduler/scheduler_config.json
SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
LAYOUT = {"transformer": "diffusers", "vae": "diffusers", "text_encoder": "transformers",
          "text_encoder_2": "transformers", "text_encoder_3": "transformers", "tokenizer": "clip_tokenizer",
          "tokenizer_2": "clip_tokenizer", "tokenizer_3": "t5_tokenizer", "scheduler": "scheduler"}


@dataclass(frozen=True)
class SD3Settings(DiffusersSettings):
    """Settings of the SD3 adapter (the fields of :class:`DiffusersSettings` with SD3's defaults, and its own)."""

    names: ClassVar[tuple[str, ...]] = ("sd3",)

    resolution: int = 1024
    """Image side in pixels: one of :data:`RESOLUTIONS`."""
    coords: str = "flow"
    """``flow`` (native ``t``, the original's) or ``edm`` (``sigma = t / (1 - t)``)."""
    schedule: str | None = None
    """Default grid; None: ``flowmatch`` in flow coordinates, ``flowmatch_dpm`` in EDM coordinates (needs t < 1)."""
    guidance_scale: float = 4.5
    """Classifier-free guidance scale (1 disables CFG: one pass per evaluation)."""
    negative_prompt: str = ""
    """Prompt of the unconditional CFG branch."""
    max_sequence_length: int = 256
    """T5 tokens per prompt (longer prompts are truncated with a warning)."""
    shift: float | None = None
    """Static time shift of the grids; None: the weights' scheduler config (3.0 for SD3-Medium)."""


class SD3Denoiser(FlowDenoiser):
    """Flow denoiser around an SD3 transformer with CFG inside (batch ``[uncond, cond]``).

    Args:
        transformer: ``SD3Transformer2DModel``.
        guidance_scale (`float`): CFG scale; 1 disables CFG.
        coords (`str`): ``"flow"`` or ``"edm"``.
        t_min (`float`), t_max (`float`): the grid range in flow time (``t_max < 1`` in EDM coordinates).
    """

    def __init__(self, transformer, guidance_scale: float = 4.5, coords: str = "flow", t_min: float = 0.0029940,
                 t_max: float = 1.0, device="cpu"):
        self.transformer = transformer
        self.guidance_scale = float(guidance_scale)
        self.coords = coords
        self.t_min, self.t_max = t_min, t_max
        self.device = torch.device(device)

    @property
    def passes_per_eval(self) -> int:
        return 1 if self.guidance_scale == 1.0 else 2

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, c: Prepared) -> torch.Tensor:
        dt = self.transformer.dtype
        h = x_t.to(dt)
        ts = (t * 1000).to(self.device, torch.float32)
        if self.passes_per_eval == 2:
            v = self.transformer(hidden_states=torch.cat([h, h]), timestep=torch.cat([ts, ts]),
                                 encoder_hidden_states=torch.cat([c.tensors["neg_embeds"], c.tensors["embeds"]]),
                                 pooled_projections=torch.cat([c.tensors["neg_pooled"], c.tensors["pooled"]]),
                                 return_dict=False)[0]
            v_u, v_c = v.float().chunk(2)
            return v_u + self.guidance_scale * (v_c - v_u)
        return self.transformer(hidden_states=h, timestep=ts, encoder_hidden_states=c.tensors["embeds"],
                                pooled_projections=c.tensors["pooled"], return_dict=False)[0].float()


class SD3Backbone(DiffusersBackbone):
    """SD3 as a :class:`~epd.backbones.base.Backbone` (flow coordinates and the original's grid by default)."""

    name = "sd3"
    Settings = SD3Settings
    pipeline_class = "StableDiffusion3Pipeline"
    default_scheduler_config = SCHEDULER_CONFIG
    default_dtype = torch.float16  # the original's choice
    weights_name = "sd3"
    layout = LAYOUT
    component_classes = {"transformer": "SD3Transformer2DModel", "vae": "AutoencoderKL"}
    resolutions = RESOLUTIONS
    title = "SD3-Medium"
    resolution_message = "{title} runs at {allowed} px here (the original's settings), got {got}"
    flow = True

    def __init__(self, pipe, settings: SD3Settings, device):
        super().__init__(pipe, settings, device)
        self.transformer = pipe.transformer
        if self.scheduler_config.get("use_dynamic_shifting"):
            raise ConfigError("weights: the SD3 scheduler config enables dynamic shifting; SD3-Medium uses a static "
                              "shift (check backbone.kind and the weights folder)")
        shift = settings.shift
        self.shift = float(shift if shift is not None else self.scheduler_config.get("shift", 3.0))
        self.default_schedule = default_flow_schedule(settings)
        t_min = self.shift * 1e-3 / (1 + (self.shift - 1) * 1e-3)
        t_max = 1.0 if settings.coords == "flow" else float(sd3_sigmas(3, self.shift, "flowmatch_dpm")[0])
        self.denoiser = SD3Denoiser(self.transformer, settings.guidance_scale, settings.coords, t_min, t_max,
                                    self.device)
        vae_scale = self.vae_scale
        patch = self.transformer.config.patch_size
        if self.resolution % (vae_scale * patch):
            raise ConfigError(f"backbone.resolution: {self.resolution} must be a multiple of {vae_scale * patch} "
                              f"(VAE factor {vae_scale} x patch size {patch})")
        lat = self.resolution // vae_scale
        self.latent_shape = (self.transformer.config.in_channels, lat, lat)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_components(cls, transformer, vae=None, text_encoders=(None, None, None), tokenizers=(None, None, None),
                        scheduler_config: dict | None = None, config: dict | None = None, device="cpu",
                        dtype=None) -> "SD3Backbone":
        """Wrap already-built modules.

        Args:
            transformer: ``SD3Transformer2DModel``.
            vae: ``AutoencoderKL`` or None.
            text_encoders (`tuple`): ``(CLIPTextModelWithProjection, CLIPTextModelWithProjection, T5EncoderModel)``;
                the T5 may be None (diffusers then uses zeros, as the pipeline does).
            tokenizers (`tuple`): ``(CLIPTokenizer, CLIPTokenizer, T5TokenizerFast)``.
            scheduler_config (`dict`, *optional*): defaults to SD3-Medium's (static shift 3.0).
            config (`dict`): backbone settings (see :class:`SD3Settings`).
        """
        te1, te2, te3 = text_encoders
        return cls._assemble({"transformer": transformer, "vae": vae, "text_encoder": te1, "tokenizer": tokenizers[0],
                              "text_encoder_2": te2, "tokenizer_2": tokenizers[1], "text_encoder_3": te3,
                              "tokenizer_3": tokenizers[2]}, scheduler_config, config, device, dtype)

    # ------------------------------------------------------------------ Backbone protocol
    @torch.no_grad()
    def prepare(self, prompts: list[str], negative_prompt: str | list[str] | None = None) -> Prepared:
        """Joint CLIP-L/CLIP-G/T5 embeddings and pooled CLIP embeddings of ``prompts`` and of the negative prompt
        (default ``""``), computed once. Over-long prompts are truncated with a warning (CLIP 77 tokens, T5
        ``max_sequence_length``)."""
        prompts = check_prompts(prompts)
        p = self.pipe
        if p.text_encoder is None or p.tokenizer is None or p.text_encoder_2 is None:
            raise ConfigError("prepare: this SD3 backbone was built without its CLIP text encoders; "
                              "use prepare_embeds()")
        warn_truncation(p.tokenizer, prompts, p.tokenizer_max_length, "CLIP text encoder")
        if p.text_encoder_3 is not None:
            warn_truncation(p.tokenizer_3, prompts, self.settings.max_sequence_length, "T5 (max_sequence_length)")
        neg = self.settings.negative_prompt if negative_prompt is None else negative_prompt
        neg = [neg] * len(prompts) if isinstance(neg, str) else check_prompts(neg)
        emb, neg_emb, pooled, neg_pooled = p.encode_prompt(
            prompts, None, None, device=self.device, do_classifier_free_guidance=True, negative_prompt=neg,
            max_sequence_length=self.settings.max_sequence_length)
        return self.prepare_embeds(emb, pooled, neg_emb, neg_pooled)

    def prepare_embeds(self, embeds: torch.Tensor, pooled: torch.Tensor, neg_embeds: torch.Tensor | None = None,
                       neg_pooled: torch.Tensor | None = None) -> Prepared:
        """Conditioning from precomputed embeddings ``(B, L, 4096)`` and pooled ``(B, 2048)`` (negatives: zeros)."""
        dt = self.transformer.dtype
        neg_embeds = torch.zeros_like(embeds) if neg_embeds is None else neg_embeds
        neg_pooled = torch.zeros_like(pooled) if neg_pooled is None else neg_pooled
        if neg_embeds.shape != embeds.shape or neg_pooled.shape != pooled.shape:
            raise ConfigError("prepare_embeds: negative embeddings must have the prompt embeddings' shapes")
        named = {"embeds": embeds, "pooled": pooled, "neg_embeds": neg_embeds, "neg_pooled": neg_pooled}
        return Prepared({n: t.to(self.device, dt) for n, t in named.items()})

    def sigmas(self, num_points: int, schedule: str | None = None, **kw) -> torch.Tensor:
        """Grid in the denoiser's coordinates.

        Args:
            schedule (`str`): ``"flowmatch"`` (original, ends above 0), ``"flowmatch_official"`` (the pipeline's
                ``num_points - 1`` steps, ends at 0), ``"flowmatch_dpm"`` (starts below 1; needed in EDM coordinates).
            kw: ``shift`` overrides the backbone's.
        """
        t = sd3_sigmas(num_points, float(kw.pop("shift", None) or self.shift), schedule or self.default_schedule)
        return t if self.coords == "flow" else flow_to_edm(t)

    def sigmas_for_table(self, table) -> torch.Tensor:
        """The original's grid for an SD3 table: ``schedule_type`` (``flowmatch``), ``num_steps`` and its shift
        (attribute -> ``backbone_config`` -> this model's). The stored sigma range is ignored, as in the original."""
        schedule = table_value(table, "schedule_type") or "flowmatch"
        if schedule not in FLOW_SCHEDULES:
            raise ConfigError(f"predictor schedule_type {schedule!r} is not a flow-matching grid; SD3 needs flowmatch")
        return self.sigmas(table.num_steps, schedule, shift=table_value(table, "flowmatch_shift"))


BACKBONE = SD3Backbone
check = SD3Backbone.check
load = SD3Backbone.from_section
