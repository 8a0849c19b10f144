"""Stable Diffusion 3 (Medium) through diffusers (SD3Transformer2DModel + AutoencoderKL + 2x CLIP + T5).

A rectified-flow velocity model ``x_t = (1 - t) x0 + t eps``. The transformer takes ``timestep = 1000 t``;
classifier-free guidance ``v_u + g (v_c - v_u)`` (``g = 4.5``, negative prompt ``""``) runs in one doubled
batch (spec §3.4, §7.2). Coordinates (:class:`~epd.backbones.diffusers_common.FlowDenoiser`): ``"flow"``
(native ``t``, the original's and the default) or ``"edm"`` (``sigma = t / (1 - t)``). Grids
(:mod:`epd.backbones.flow_schedules`): ``flowmatch`` (original), ``flowmatch_official`` (pipeline),
``flowmatch_dpm`` (diffusers' DPM-Solver flow grid). Latents ``16 x (res/8)^2``; decode
``x / scaling_factor + shift_factor``.
"""

from __future__ import annotations

import torch

from ..denoiser import Prepared
from ..errors import ConfigError
from ..flow_schedules import FLOW_SCHEDULES, flow_to_edm, sd3_sigmas
from .diffusers_common import (DiffusersBackbone, FlowDenoiser, check_offload, check_prompts, check_weights_folder,
                               default_flow_schedule, parse_settings, place, resolve_dtype, settings_from_section,
                               table_value, warn_truncation)
from .weights import resolve

__all__ = ["SD3Denoiser", "SD3Backbone", "load", "check", "DEFAULTS", "LAYOUT", "SCHEDULER_CONFIG", "RESOLUTIONS"]

DEFAULTS = {
    "resolution": 1024,
    "guidance_scale": 4.5,
    "negative_prompt": "",
    "max_sequence_length": 256,
    "coords": "flow",
    "schedule": None,  # None: flowmatch (flow coords) / flowmatch_dpm (edm coords, needs t < 1)
    "shift": None,  # None: the weights' scheduler config (3.0 for SD3-Medium)
}
RESOLUTIONS = (512, 1024)  # what the original supports and SD3-Medium was trained for
# stabilityai/stable-diffusion-3-medium-diffusers/scheduler/scheduler_config.json
SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
LAYOUT = {"transformer": "diffusers", "vae": "diffusers", "text_encoder": "transformers",
          "text_encoder_2": "transformers", "text_encoder_3": "transformers", "tokenizer": "clip_tokenizer",
          "tokenizer_2": "clip_tokenizer", "tokenizer_3": "t5_tokenizer", "scheduler": "scheduler"}


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
    flow = True

    def __init__(self, pipe, settings: dict, device):
        self.pipe = pipe
        self.settings = settings
        self.device = torch.device(device)
        self.transformer, self.vae = pipe.transformer, pipe.vae
        self.scheduler_config = dict(pipe.scheduler.config)
        if self.scheduler_config.get("use_dynamic_shifting"):
            raise ConfigError("weights: the SD3 scheduler config enables dynamic shifting; SD3-Medium uses a static "
                              "shift (check backbone.kind and the weights folder)")
        shift = settings["shift"]
        self.shift = float(shift if shift is not None else self.scheduler_config.get("shift", 3.0))
        self.default_schedule = default_flow_schedule(settings)
        t_min = self.shift * 1e-3 / (1 + (self.shift - 1) * 1e-3)
        t_max = 1.0 if settings["coords"] == "flow" else float(sd3_sigmas(3, self.shift, "flowmatch_dpm")[0])
        self.denoiser = SD3Denoiser(self.transformer, settings["guidance_scale"], settings["coords"], t_min, t_max,
                                    self.device)
        vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 8
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
            config (`dict`): backbone settings (see :data:`DEFAULTS`).
        """
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        settings = parse_settings("sd3", config, DEFAULTS)
        te1, te2, te3 = text_encoders
        for m in (transformer, vae, te1, te2, te3):
            if m is not None:
                m.eval().to(device=device, dtype=dtype) if dtype is not None else m.eval().to(device)
        sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config or SCHEDULER_CONFIG)
        pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=sched, vae=vae, text_encoder=te1,
                                        tokenizer=tokenizers[0], text_encoder_2=te2, tokenizer_2=tokenizers[1],
                                        text_encoder_3=te3, tokenizer_3=tokenizers[2])
        return cls(pipe, settings, device)

    @classmethod
    def from_pretrained(cls, path=None, *, config: dict | None = None, device="cpu", dtype=None) -> "SD3Backbone":
        """Load SD3-Medium from a local diffusers folder (``SD3_MODEL_PATH``, ``data/weights/sd3-medium``, HF cache).

        Args:
            config (`dict`): backbone settings; ``dtype`` defaults to float16 on CUDA (the original's choice).
        """
        from diffusers import StableDiffusion3Pipeline

        settings = parse_settings("sd3", config, DEFAULTS)
        device = settings["device"] or device
        check_offload(settings["offload"], device)
        folder, variant = _check(settings, path)
        dtype = resolve_dtype(dtype or settings["dtype"], device, torch.float16)
        pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), torch_dtype=dtype, variant=variant,
                                                        local_files_only=True)
        place(pipe, settings["offload"], device)
        return cls(pipe, settings, device)

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
            warn_truncation(p.tokenizer_3, prompts, self.settings["max_sequence_length"], "T5 (max_sequence_length)")
        neg = self.settings["negative_prompt"] if negative_prompt is None else negative_prompt
        neg = [neg] * len(prompts) if isinstance(neg, str) else check_prompts(neg)
        emb, neg_emb, pooled, neg_pooled = p.encode_prompt(
            prompts, None, None, device=self.device, do_classifier_free_guidance=True, negative_prompt=neg,
            max_sequence_length=self.settings["max_sequence_length"])
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


def _check(settings: dict, path=None):
    if settings["resolution"] not in RESOLUTIONS:
        raise ConfigError(f"backbone.resolution: SD3-Medium runs at {list(RESOLUTIONS)} px here (the original's "
                          f"settings), got {settings['resolution']}")
    folder = resolve("backbone", "sd3", explicit=path or settings["model_path"])
    variant = check_weights_folder(folder, "sd3", LAYOUT, "StableDiffusion3Pipeline",
                                   {"transformer": "SD3Transformer2DModel", "vae": "AutoencoderKL"})
    return folder, variant


def check(config: dict | None = None, path=None):
    """Resolve SD3 weights and validate the folder (files, architecture) and resolution without loading them.

    Returns:
        `Path`: the weights folder. Raises ``MissingWeightsError`` listing every missing file, or ``ConfigError``.
    """
    return _check(parse_settings("sd3", settings_from_section("sd3", config), DEFAULTS), path)[0]


def load(config: dict, device="cpu", **_) -> SD3Backbone:
    """Load the backbone described by a workflow ``backbones.<key>`` section (``kind: sd3``; adapter settings
    at its top level or in ``backend_config``) from local weights only."""
    return SD3Backbone.from_pretrained(None, config=settings_from_section("sd3", config), device=device)
