"""FLUX.1-dev through diffusers (FluxTransformer2DModel + AutoencoderKL + CLIP + T5).

Guidance-distilled rectified flow: the guidance scale (3.5) enters as the transformer's guidance embedding, with
**no** batch doubling and no negative prompt (spec §3.4, §7.3). The solver sees a 4-D latent
``(16, 2 * (res // 16), 2 * (res // 16))``; the adapter packs it into 2x2 patches (``(res/16)^2`` tokens x 64)
with ``latent_image_ids`` for the transformer and unpacks the velocity; the transformer's time input is ``t``.
Grids (:mod:`epd.flow_schedules`) use ``mu`` from the packed token count (1.15 at 1024x1024):
``flowmatch`` (the original's ``s = linspace(1, 1/1000, N)``), ``flowmatch_official`` (``FluxPipeline``'s
``linspace(1, 1/steps, steps)`` plus 0; differs from the original, spec §2), ``flowmatch_dpm``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..denoiser import Prepared
from ..errors import ConfigError
from ..flow_schedules import FLOW_SCHEDULES, calculate_flux_mu, flow_to_edm, flux_sigmas
from .diffusers_common import (DiffusersBackbone, FlowDenoiser, check_prompts, default_flow_schedule, table_value,
                               warn_truncation)
from .diffusers_settings import DiffusersSettings

__all__ = ["FluxDenoiser", "FluxBackbone", "FluxSettings", "load", "check", "LAYOUT", "SCHEDULER_CONFIG", "RESOLUTIONS",
           "pack_latents", "unpack_latents", "latent_image_ids"]

RESOLUTIONS = (512, 1024)
# black-forest-labs/FLUX.1-dev/scheduler/scheduler_config.json
SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                    "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                    "max_image_seq_len": 4096}
LAYOUT = {"transformer": "diffusers", "vae": "diffusers", "text_encoder": "transformers",
          "text_encoder_2": "transformers", "tokenizer": "clip_tokenizer", "tokenizer_2": "t5_tokenizer",
          "scheduler": "scheduler"}


@dataclass(frozen=True)
class FluxSettings(DiffusersSettings):
    """Settings of the FLUX adapter (the fields of :class:`DiffusersSettings` with FLUX.1-dev's defaults, and its
    own)."""

    names: ClassVar[tuple[str, ...]] = ("flux",)

    resolution: int = 1024
    """Image side in pixels: one of :data:`RESOLUTIONS`."""
    coords: str = "flow"
    """``flow`` (native ``t``, the original's) or ``edm`` (``sigma = t / (1 - t)``)."""
    schedule: str | None = None
    """Default grid; None: ``flowmatch`` in flow coordinates, ``flowmatch_dpm`` in EDM coordinates."""
    guidance_scale: float = 3.5
    """Embedded guidance: the transformer's guidance-embedding value (no batch doubling)."""
    negative_prompt: str | None = None
    """Must stay unset: FLUX.1-dev takes none (true CFG is not wired, as in the original)."""
    max_sequence_length: int = 512
    """T5 tokens per prompt (longer prompts are truncated with a warning)."""
    mu: float | None = None
    """Dynamic time shift of the grids; None: from the packed token count (:func:`calculate_flux_mu`)."""
    shift: float = 3.0
    """Stored by the original, unused with dynamic shifting."""


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H/2 * W/2, 4C)``: 2x2 patches, as ``FluxPipeline._pack_latents``."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a latent of height ``h`` and width ``w``."""
    b, _, ch = x.shape
    return x.view(b, h // 2, w // 2, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, ch // 4, h, w)


def latent_image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Positional ids ``(h/2 * w/2, 3)`` of the packed tokens: ``(0, row, col)``."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxDenoiser(FlowDenoiser):
    """Flow denoiser around a FLUX transformer with embedded guidance (one pass per evaluation).

    Args:
        transformer: ``FluxTransformer2DModel``.
        guidance_scale (`float`): the guidance embedding value (ignored when the model has no guidance embedder).
        coords (`str`): ``"flow"`` or ``"edm"``.
    """

    passes_per_eval = 1

    def __init__(self, transformer, guidance_scale: float = 3.5, coords: str = "flow", t_min: float = 1e-3,
                 t_max: float = 1.0, device="cpu"):
        self.transformer = transformer
        self.guidance_scale = float(guidance_scale)
        self.coords = coords
        self.t_min, self.t_max = t_min, t_max
        self.device = torch.device(device)
        self._ids: dict = {}

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, c: Prepared) -> torch.Tensor:
        m, _, h, w = x_t.shape
        dt = self.transformer.dtype
        key = (h, w)
        if key not in self._ids:
            self._ids[key] = latent_image_ids(h, w, self.device, dt)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((m,), self.guidance_scale, device=self.device, dtype=torch.float32)
        v = self.transformer(hidden_states=pack_latents(x_t.to(dt)), timestep=t.to(self.device, dt),
                             guidance=guidance, pooled_projections=c.tensors["pooled"],
                             encoder_hidden_states=c.tensors["embeds"], txt_ids=c.extra["text_ids"],
                             img_ids=self._ids[key], return_dict=False)[0]
        return unpack_latents(v.float(), h, w)


class FluxBackbone(DiffusersBackbone):
    """FLUX.1-dev as a :class:`~epd.backbones.base.Backbone` (flow coordinates and the original's grid by default)."""

    name = "flux"
    Settings = FluxSettings
    pipeline_class = "FluxPipeline"
    default_scheduler_config = SCHEDULER_CONFIG
    default_dtype = torch.bfloat16
    weights_name = "flux"
    layout = LAYOUT
    component_classes = {"transformer": "FluxTransformer2DModel", "vae": "AutoencoderKL"}
    resolutions = RESOLUTIONS
    title = "FLUX.1-dev"
    flow = True

    def __init__(self, pipe, settings: FluxSettings, device):
        super().__init__(pipe, settings, device)
        self.transformer = pipe.transformer
        if settings.negative_prompt:
            raise ConfigError("backbone.negative_prompt: FLUX.1-dev is guidance-distilled and takes no negative prompt "
                              "(true CFG is not wired, as in the original); remove the setting")
        vae_scale = self.vae_scale
        if self.resolution % (vae_scale * 2):
            raise ConfigError(f"backbone.resolution: {self.resolution} must be a multiple of {vae_scale * 2} "
                              f"(VAE factor {vae_scale} x 2x2 packing)")
        lat = 2 * (self.resolution // (vae_scale * 2))
        self.latent_shape = (self.transformer.config.in_channels // 4, lat, lat)
        cfg = self.scheduler_config
        self.image_seq_len = (lat // 2) ** 2
        self.mu = float(settings.mu) if settings.mu is not None else calculate_flux_mu(
            self.image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        self.default_schedule = default_flow_schedule(settings)
        t_max = 1.0 if settings.coords == "flow" else float(flux_sigmas(3, self.mu, "flowmatch_dpm")[0])
        self.denoiser = FluxDenoiser(self.transformer, settings.guidance_scale, settings.coords, 1e-3, t_max,
                                     self.device)

    pipeline_latent_dims = 3  # FluxPipeline's latents are packed 2x2 patches (B, L, 4C)

    def pipeline_latents(self, x: torch.Tensor) -> torch.Tensor:
        """States as ``FluxPipeline``'s packed latents."""
        return pack_latents(x)

    @classmethod
    def latent_pixels(cls, shape: tuple, vae_scale: int = 8) -> int:
        """Image side of square packed latents ``(B, L, C)``: ``sqrt(L)`` 2x2 patches per side."""
        return round(int(shape[1]) ** 0.5) * 2 * vae_scale

    def from_pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """``FluxPipeline``'s packed latents as states ``(B, *latent_shape)``."""
        return unpack_latents(latents, *self.latent_shape[1:])

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_components(cls, transformer, vae=None, text_encoders=(None, None), tokenizers=(None, None),
                        scheduler_config: dict | None = None, config: dict | None = None, device="cpu",
                        dtype=None) -> "FluxBackbone":
        """Wrap already-built modules.

        Args:
            transformer: ``FluxTransformer2DModel``.
            vae: ``AutoencoderKL`` or None.
            text_encoders (`tuple`): ``(CLIPTextModel, T5EncoderModel)`` or Nones.
            tokenizers (`tuple`): ``(CLIPTokenizer, T5TokenizerFast)``.
            scheduler_config (`dict`, *optional*): defaults to FLUX.1-dev's (dynamic shifting, 0.5 -> 1.15).
            config (`dict`): backbone settings (see :class:`FluxSettings`).
        """
        return cls._assemble({"vae": vae, "text_encoder": text_encoders[0], "tokenizer": tokenizers[0],
                              "text_encoder_2": text_encoders[1], "tokenizer_2": tokenizers[1],
                              "transformer": transformer}, scheduler_config, config, device, dtype)

    @classmethod
    def check_folder(cls, folder, settings: FluxSettings) -> None:
        """The guidance-distilled FLUX.1-dev: its transformer has a guidance embedding."""
        tcfg = json.loads((folder / "transformer" / "config.json").read_text())
        if not tcfg.get("guidance_embeds", False):
            raise ConfigError(f"weights at {folder}: the transformer has no guidance embedding (FLUX.1-schnell?); "
                              "this backbone is the guidance-distilled FLUX.1-dev")

    # ------------------------------------------------------------------ Backbone protocol
    @torch.no_grad()
    def prepare(self, prompts: list[str], negative_prompt=None) -> Prepared:
        """Pooled CLIP and T5 embeddings of ``prompts`` (computed once). Over-long prompts are truncated with a
        warning (CLIP 77 tokens, T5 ``max_sequence_length``)."""
        if negative_prompt:
            raise ConfigError("negative_prompt: FLUX.1-dev takes no negative prompt (guidance is embedded)")
        prompts = check_prompts(prompts)
        p = self.pipe
        if p.text_encoder is None or p.text_encoder_2 is None or p.tokenizer is None or p.tokenizer_2 is None:
            raise ConfigError("prepare: this FLUX backbone was built without its text encoders; use prepare_embeds()")
        warn_truncation(p.tokenizer, prompts, p.tokenizer_max_length, "CLIP text encoder")
        warn_truncation(p.tokenizer_2, prompts, self.settings.max_sequence_length, "T5 (max_sequence_length)")
        emb, pooled, _ = p.encode_prompt(prompts, None, device=self.device,
                                         max_sequence_length=self.settings.max_sequence_length)
        return self.prepare_embeds(emb, pooled)

    def prepare_embeds(self, embeds: torch.Tensor, pooled: torch.Tensor) -> Prepared:
        """Conditioning from precomputed T5 embeddings ``(B, L, 4096)`` and pooled CLIP ``(B, 768)``."""
        dt = self.transformer.dtype
        text_ids = torch.zeros(embeds.shape[1], 3, device=self.device, dtype=dt)
        return Prepared({"embeds": embeds.to(self.device, dt), "pooled": pooled.to(self.device, dt)},
                        {"text_ids": text_ids})

    def sigmas(self, num_points: int, schedule: str | None = None, **kw) -> torch.Tensor:
        """Grid in the denoiser's coordinates.

        Args:
            schedule (`str`): ``"flowmatch"`` (original), ``"flowmatch_official"`` (``FluxPipeline``, ends at 0)
                or ``"flowmatch_dpm"``.
            kw: ``mu`` overrides the backbone's.
        """
        mu = kw.pop("mu", None)
        t = flux_sigmas(num_points, self.mu if mu is None else float(mu), schedule or self.default_schedule)
        return t if self.coords == "flow" else flow_to_edm(t)

    def sigmas_for_table(self, table) -> torch.Tensor:
        """The original's grid for a FLUX table: ``schedule_type``, ``num_steps`` and the table's ``flowmatch_mu``
        (attribute -> ``backbone_config`` -> this backbone's ``mu``)."""
        schedule = table_value(table, "schedule_type") or "flowmatch"
        if schedule not in FLOW_SCHEDULES:
            raise ConfigError(f"predictor schedule_type {schedule!r} is not a flow-matching grid; FLUX needs flowmatch")
        return self.sigmas(table.num_steps, schedule, mu=table_value(table, "flowmatch_mu"))


BACKBONE = FluxBackbone
check = FluxBackbone.check
load = FluxBackbone.from_section
