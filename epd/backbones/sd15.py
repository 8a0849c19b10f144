"""Stable Diffusion 1.5 through diffusers (UNet2DConditionModel + AutoencoderKL + CLIP text encoder).

The UNet predicts ``eps`` for the discrete VP process ``x_vp = sqrt(abar) x0 + sqrt(1 - abar) eps``. The adapter
presents it in EDM coordinates (DESIGN.md): ``x = x_vp / sqrt(abar)``, ``sigma = sqrt((1 - abar) / abar)`` and

    D(x, sigma) = x - sigma * eps_cfg(x / sqrt(1 + sigma^2), tau(sigma))

with classifier-free guidance ``eps_u + w (eps_c - eps_u)`` (``w = 7.5``, unconditional prompt ``""``) in one
doubled batch. The UNet timestep ``tau(sigma)`` has three readings (``timestep_mode``):

* ``"continuous"`` (default, the original's ``CFGPrecond``): continuous VP time ``t`` from piecewise-linear
  interpolation of ``log alpha`` on ``t_i = i / 1000`` (:class:`epd.schedules.VPTable`), ``tau = 1000 t - 1``;
  on the table's own sigmas this is the integer index.
* ``"discrete"``: the nearest integer of the above (exactly diffusers' integer timesteps on table sigmas).
* ``"log_sigma"``: diffusers' ``EulerDiscreteScheduler._sigma_to_t`` (linear in ``log sigma`` between indices),
  for parity with diffusers runs on custom sigmas.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..denoiser import Prepared
from ..errors import ConfigError
from ..schedules import VPTable, discrete_vp, get_schedule, scaled_linear_alphas_cumprod, vp_spacing
from .diffusers_common import (DiffusersBackbone, bcast, check_prompts, expand_cond, per_sample, table_value,
                               warn_truncation)
from .diffusers_settings import DiffusersSettings

__all__ = ["SD15Denoiser", "SD15Backbone", "SD15Settings", "load", "check", "LAYOUT", "SCHEDULER_CONFIG",
           "TIMESTEP_MODES"]

TIMESTEP_MODES = ("continuous", "discrete", "log_sigma")
SCHEDULES = ("discrete", "leading", "trailing", "edm", "polynomial", "logsnr", "time_uniform")
# stable-diffusion-v1-5/scheduler/scheduler_config.json (the values that matter here).
SCHEDULER_CONFIG = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                    "steps_offset": 1, "prediction_type": "epsilon", "skip_prk_steps": True, "clip_sample": False}
LAYOUT = {"unet": "diffusers", "vae": "diffusers", "text_encoder": "transformers", "tokenizer": "clip_tokenizer",
          "scheduler": "scheduler"}


@dataclass(frozen=True)
class SD15Settings(DiffusersSettings):
    """Settings of the SD1.5 adapter (the fields of :class:`DiffusersSettings` with SD1.5's defaults, and its own)."""

    names: ClassVar[tuple[str, ...]] = ("sd15", "ldm")  # ``ldm``: the original's name for it

    resolution: int = 512
    """Image side in pixels: the weights' native size (512 for SD1.5)."""
    coords: str = "edm"
    """SD1.5 runs in ``edm`` coordinates only."""
    schedule: str = "discrete"
    """Default grid: ``discrete`` (the original's), ``leading``, ``trailing``, ``edm``, ``polynomial``, ``logsnr``,
    ``time_uniform``."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale (1 disables CFG: one pass per evaluation)."""
    negative_prompt: str = ""
    """Prompt of the unconditional CFG branch."""
    timestep_mode: str = "continuous"
    """UNet time input: ``continuous`` (the original's), ``discrete`` or ``log_sigma`` (see the module docstring)."""


def alphas_cumprod_from_config(scheduler_config: dict) -> torch.Tensor:
    """The 1000-entry ``alphas_cumprod`` table of a scheduler config, in float64 as the original LDM code computes
    it for ``scaled_linear``/``linear`` betas (diffusers' float32 cumprod differs by < 1e-6 relative); other
    beta schedules come from diffusers."""
    cfg = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    n = int(cfg.get("num_train_timesteps", 1000))
    b0, b1 = float(cfg.get("beta_start", 0.0001)), float(cfg.get("beta_end", 0.02))
    kind = cfg.get("beta_schedule", "linear")
    if cfg.get("trained_betas") is None and not cfg.get("rescale_betas_zero_snr"):
        if kind == "scaled_linear":
            return scaled_linear_alphas_cumprod(b0, b1, n)
        if kind == "linear":
            return torch.cumprod(1 - torch.linspace(b0, b1, n, dtype=torch.float64), 0)
    from diffusers import DDPMScheduler

    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr")
    return DDPMScheduler(**{k: cfg[k] for k in keep if k in cfg}).alphas_cumprod.to(torch.float64)


class SD15Denoiser:
    """EDM-coordinate denoiser around an SD1.5 UNet with CFG inside (see module docstring).

    Args:
        unet: ``UNet2DConditionModel`` (any dtype/device; inputs are cast to it).
        alphas_cumprod (`torch.Tensor`): the 1000-entry training table.
        guidance_scale (`float`): CFG scale; 1 disables CFG (one pass per evaluation).
        timestep_mode (`str`): ``"continuous"``, ``"discrete"`` or ``"log_sigma"``.
        device: execution device.
    """

    coords = "edm"

    def __init__(self, unet, alphas_cumprod: torch.Tensor, guidance_scale: float = 7.5,
                 timestep_mode: str = "continuous", device="cpu"):
        if timestep_mode not in TIMESTEP_MODES:
            raise ConfigError(f"backbone.timestep_mode: expected one of {list(TIMESTEP_MODES)}, got {timestep_mode!r}")
        self.unet = unet
        self.vp = VPTable(alphas_cumprod)
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.log_sigmas = 0.5 * torch.log((1 - ac) / ac)
        self.guidance_scale = float(guidance_scale)
        self.timestep_mode = timestep_mode
        self.device = torch.device(device)
        # device copies: the timestep lookup must not round-trip through the host (a sync, and no CUDA graphs)
        self._vp_dev, self._log_sigmas_dev = self.vp.to(self.device), self.log_sigmas.to(self.device)
        self.sigma_min = float(self.log_sigmas[0].exp())
        self.sigma_max = float(self.log_sigmas[-1].exp())

    @property
    def passes_per_eval(self) -> int:
        return 1 if self.guidance_scale == 1.0 else 2

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """UNet time input (float64) for EDM noise levels ``sigma``."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=self.device)
        if self.timestep_mode == "log_sigma":
            ls = self._log_sigmas_dev
            x = torch.log(sigma.clamp_min(1e-10))
            hi = torch.searchsorted(ls, x).clamp(1, len(ls) - 1)
            w = ((x - ls[hi - 1]) / (ls[hi] - ls[hi - 1])).clamp(0, 1)
            return hi - 1 + w
        tau = self.vp.T * self._vp_dev.sigma_inv(sigma) - 1
        if self.timestep_mode == "discrete":
            tau = tau.round().clamp(0, self.vp.T - 1)
        return tau

    def __call__(self, x: torch.Tensor, sigma, cond: Prepared = None) -> torch.Tensor:
        s = per_sample(sigma, x)
        c = expand_cond(cond, x.shape[0])
        x_in = (x / bcast(torch.sqrt(1 + s**2), x)).to(self.dtype)
        tau = self.timestep(s).to(self.device, torch.float32)
        if self.passes_per_eval == 2:
            eps = self.unet(torch.cat([x_in, x_in]), torch.cat([tau, tau]),
                            encoder_hidden_states=torch.cat([c.tensors["uncond"], c.tensors["cond"]]),
                            return_dict=False)[0]
            eps_u, eps_c = eps.float().chunk(2)
            eps = eps_u + self.guidance_scale * (eps_c - eps_u)
        else:
            eps = self.unet(x_in, tau, encoder_hidden_states=c.tensors["cond"], return_dict=False)[0].float()
        return x - bcast(s, x) * eps.to(x.dtype)


class SD15Backbone(DiffusersBackbone):
    """SD1.5 as a :class:`~epd.backbones.base.Backbone`: EDM coordinates, ``discrete`` grid by default.

    Build with :meth:`from_pretrained` (local diffusers folder) or :meth:`from_components` (tests, benchmarks).
    """

    name = "sd15"
    Settings = SD15Settings
    pipeline_class = "StableDiffusionPipeline"
    pipeline_kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    default_scheduler_config = SCHEDULER_CONFIG
    default_dtype = torch.float16
    weights_name = "sd15"
    layout = LAYOUT
    component_classes = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}
    table_records_resolution = False  # the original's SD1.5 tables record a meaningless img_resolution=1024
    flow = False
    default_schedule = "discrete"

    def __init__(self, pipe, settings: SD15Settings, device):
        super().__init__(pipe, settings, device)
        self.unet = pipe.unet
        self.text_encoder, self.tokenizer = pipe.text_encoder, pipe.tokenizer
        if settings.coords != "edm":
            raise ConfigError("backbone.coords: SD1.5 runs in 'edm' coordinates only")
        self.default_schedule = settings.schedule
        if self.default_schedule not in SCHEDULES:
            raise ConfigError(f"backbone.schedule: {self.default_schedule!r} is not available for SD1.5; accepted: "
                              f"{list(SCHEDULES)}")
        self.alphas_cumprod = alphas_cumprod_from_config(self.scheduler_config)
        self.denoiser = SD15Denoiser(self.unet, self.alphas_cumprod, settings.guidance_scale, settings.timestep_mode,
                                     self.device)
        vae_scale = self.vae_scale
        down = 2 ** (len(self.unet.config.block_out_channels) - 1)
        if self.resolution % (vae_scale * down):
            raise ConfigError(f"backbone.resolution: {self.resolution} must be a multiple of {vae_scale * down} "
                              f"(VAE factor {vae_scale} x UNet downsampling {down})")
        lat = self.resolution // vae_scale
        self.latent_shape = (self.unet.config.in_channels, lat, lat)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_components(cls, unet, vae=None, text_encoder=None, tokenizer=None, scheduler_config: dict | None = None,
                        config: dict | None = None, device="cpu", dtype=None) -> "SD15Backbone":
        """Wrap already-built modules (tiny random ones in tests, full-size random ones in benchmarks).

        Args:
            unet, vae, text_encoder, tokenizer: diffusers/transformers objects (``vae``/text parts may be None;
                then ``decode``/``prepare`` are unavailable and :meth:`prepare_embeds` supplies conditioning).
            scheduler_config (`dict`, *optional*): defaults to SD1.5's (:data:`SCHEDULER_CONFIG`).
            config (`dict`): backbone settings (see :class:`SD15Settings`).
            dtype (`torch.dtype`, *optional*): cast the modules (default: keep theirs).
        """
        return cls._assemble({"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet},
                             scheduler_config, config, device, dtype)

    @classmethod
    def check_folder(cls, folder, settings: SD15Settings) -> None:
        """SD1.5's UNet and scheduler (not SD2/SDXL weights), at the resolution the weights were trained at."""
        unet = json.loads((folder / "unet" / "config.json").read_text())
        sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        problems = []
        if unet.get("cross_attention_dim") != 768 or unet.get("in_channels") != 4:
            problems.append(f"unet cross_attention_dim={unet.get('cross_attention_dim')}, in_channels="
                            f"{unet.get('in_channels')} (SD1.5: 768 and 4; SD2/SDXL weights are not SD1.5)")
        if sched.get("prediction_type", "epsilon") != "epsilon":
            problems.append(f"scheduler prediction_type={sched.get('prediction_type')!r} (SD1.5 predicts 'epsilon')")
        if problems:
            raise ConfigError(f"weights at {folder} are not Stable Diffusion 1.5: " + "; ".join(problems))
        vae = json.loads((folder / "vae" / "config.json").read_text())
        native = int(unet.get("sample_size", 64)) * 2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1)
        if settings.resolution != native:
            raise ConfigError(f"backbone.resolution: {settings.resolution} px, but these SD1.5 weights were trained at "
                              f"{native} px (unet sample_size {unet.get('sample_size')}); set resolution: {native}")

    # ------------------------------------------------------------------ Backbone protocol
    @torch.no_grad()
    def prepare(self, prompts: list[str], negative_prompt: str | list[str] | None = None) -> Prepared:
        """CLIP embeddings of ``prompts`` and of the negative prompt (default ``""``), computed once.

        Prompts over 77 tokens are truncated with a warning, as the pipeline does.
        """
        prompts = check_prompts(prompts)
        if self.text_encoder is None or self.tokenizer is None:
            raise ConfigError("prepare: this SD1.5 backbone was built without text encoder/tokenizer; "
                              "use prepare_embeds()")
        warn_truncation(self.tokenizer, prompts, self.tokenizer.model_max_length, "CLIP text encoder")
        neg = self.settings.negative_prompt if negative_prompt is None else negative_prompt
        neg = [neg] * len(prompts) if isinstance(neg, str) else check_prompts(neg)
        cond, uncond = self.pipe.encode_prompt(prompts, self.device, 1, True, negative_prompt=neg)
        return self.prepare_embeds(cond, uncond)

    def prepare_embeds(self, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor | None = None) -> Prepared:
        """Conditioning from precomputed CLIP hidden states ``(B, 77, D)`` (negative: zeros when None)."""
        dt = self.unet.dtype
        neg = torch.zeros_like(prompt_embeds) if negative_embeds is None else negative_embeds
        if neg.shape != prompt_embeds.shape:
            raise ConfigError(f"negative_embeds: shape {tuple(neg.shape)} != prompt_embeds "
                              f"{tuple(prompt_embeds.shape)}")
        return Prepared({"cond": prompt_embeds.to(self.device, dt), "uncond": neg.to(self.device, dt)})

    def sigmas(self, num_points: int, schedule: str | None = None, **kw) -> torch.Tensor:
        """Grid of ``num_points`` EDM noise levels.

        Args:
            schedule (`str`): ``"discrete"`` (the original: uniform in continuous VP time between ``sigma_max``
                and ``sigma_min``, ``rho`` warp), ``"leading"``/``"trailing"`` (diffusers' integer timesteps for
                ``num_points - 1`` steps, then the final ``sigma`` of DDIM with ``set_alpha_to_one=False``), or an
                EDM-style grid (``edm``, ``logsnr``, ``time_uniform``) over ``[sigma_min, sigma_max]``.
            kw: ``sigma_min``, ``sigma_max``, ``rho``.
        """
        schedule = schedule or self.default_schedule
        smin, smax = kw.pop("sigma_min", None), kw.pop("sigma_max", None)
        if schedule == "discrete":
            return discrete_vp(num_points, self.denoiser.vp, smin, smax, kw.pop("rho", 1.0) or 1.0)
        if schedule in ("leading", "trailing"):
            if int(num_points) != num_points or num_points < 2:
                raise ConfigError(f"num_points: need an integer >= 2, got {num_points}")
            offset = self.scheduler_config.get("steps_offset", 0)
            _, s = vp_spacing(num_points - 1, self.alphas_cumprod, schedule, offset)
            last = 0.0 if self.scheduler_config.get("set_alpha_to_one") else self.denoiser.sigma_min
            return torch.cat([s, torch.tensor([last], dtype=torch.float64)])
        if schedule in SCHEDULES:
            return get_schedule(schedule, num_points, sigma_min=smin or self.sigma_min,
                                sigma_max=smax or self.sigma_max, **kw)
        raise ConfigError(f"schedule: {schedule!r} is not available for SD1.5; accepted: {list(SCHEDULES)}")

    def sigmas_for_table(self, table) -> torch.Tensor:
        """The grid an original SD1.5 table was made on: its ``schedule_type`` (``discrete``), ``num_steps``,
        ``schedule_rho`` and sigma range (attribute -> ``backbone_config`` -> this model's range)."""
        schedule = table_value(table, "schedule_type") or "discrete"
        return self.sigmas(table.num_steps, schedule, sigma_min=table_value(table, "sigma_min"),
                           sigma_max=table_value(table, "sigma_max"), rho=table_value(table, "schedule_rho") or 1.0)


BACKBONE = SD15Backbone
check = SD15Backbone.check
load = SD15Backbone.from_section
