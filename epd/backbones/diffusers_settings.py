"""Typed settings of the diffusers backbone adapters (SD1.5, SD3, FLUX).

:class:`DiffusersSettings` is a frozen dataclass with one documented field per setting every diffusers adapter
accepts; each adapter subclasses it with its own fields and defaults (``SD15Settings``, ``SD3Settings``,
``FluxSettings``). :meth:`DiffusersSettings.from_config` validates a ``backbone_config`` mapping key by key (the
original's ``backend_config`` names accepted as aliases) with errors naming the key.
:func:`settings_from_section` reads the adapter's part of a workflow ``backbones.<key>`` section; the study keys of
that section (:data:`epd.config.STUDY_KEYS`) belong to the workflow schema, not to the backbone.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from ..config import STUDY_KEYS
from ..errors import ConfigError

__all__ = ["DiffusersSettings", "settings_from_section", "resolve_dtype", "DTYPES", "ALIASES", "STUDY_KEYS"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
# The original's backend_config / predictor names -> ours.
ALIASES = {"torch_dtype": "dtype", "guidance_rate": "guidance_scale", "guidance": "guidance_scale",
           "model_name_or_path": "model_path", "model_id": "model_path", "flowmatch_shift": "shift",
           "flowmatch_mu": "mu", "backend": "name"}
IGNORED_ORIGINAL_KEYS = ("latent_resolution", "sigma_min", "sigma_max")
# The original's offload switches -> our ``offload`` value.
OFFLOAD_SWITCHES = {"enable_model_cpu_offload": "model", "enable_sequential_cpu_offload": "sequential"}


@dataclass(frozen=True)
class DiffusersSettings:
    """Settings every diffusers backbone accepts; adapters subclass it with their own fields and defaults.

    Read as attributes, or as ``settings["key"]`` (the mapping view callers of the earlier dict use).
    """

    names: ClassVar[tuple[str, ...]] = ()  # the adapter's registry name first, then the original's names for it

    name: str | None = None
    """The adapter's registry name (``sd15``, ``sd3``, ``flux``); set by the adapter."""
    model_path: str | None = None
    """Explicit weights folder (else the env var, ``data/weights/``, the HF cache:
    :func:`~epd.backbones.weights.resolve`)."""
    resolution: int | None = None
    """Image side in pixels."""
    dtype: Any = "auto"
    """``auto``, ``float32``, ``float16`` or ``bfloat16`` (auto: the backbone's CUDA dtype, float32 on CPU)."""
    offload: str = "none"
    """``none``, ``model`` or ``sequential``: diffusers' CPU offload (CUDA only)."""
    coords: str | None = None
    """``edm`` or ``flow``: the coordinates the denoiser presents (flow backbones offer both)."""
    schedule: str | None = None
    """Default grid name for ``sigmas()``."""
    guidance_scale: float | None = None
    """CFG scale (SD1.5/SD3) or embedded guidance (FLUX)."""
    vae_batch: int = 4
    """Images per VAE decode call."""
    device: str | None = None
    """Execution device (else the caller's)."""

    def __getitem__(self, key: str):
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_config(cls, config: dict | None) -> "DiffusersSettings":
        """Validate ``config`` (our keys or the original's ``backend_config`` keys, e.g. ``torch_dtype``,
        ``enable_model_cpu_offload``, ``flowmatch_mu``) against this class's fields; every field gets a value.

        Raises:
            ConfigError: naming the key (``backbone.<key>: ...``) and what it accepts.
        """
        out = _apply_config(cls.names[0], {f.name: f.default for f in fields(cls)}, config)
        if out["name"] not in (None, *cls.names):
            raise ConfigError(f"backbone.name: {out['name']!r} given to the {cls.names[0]} adapter")
        out["name"] = cls.names[0]
        _check_common(out)
        return cls(**out)


def _apply_config(name: str, allowed: dict, config: dict | None) -> dict:
    """``allowed`` (field -> default) updated with ``config``, aliases and the original's switches mapped."""
    out = dict(allowed)
    for key, value in (config or {}).items():
        if key in OFFLOAD_SWITCHES:
            out["offload"] = OFFLOAD_SWITCHES[key] if value else out["offload"]
            continue
        if key in IGNORED_ORIGINAL_KEYS:
            continue
        key = ALIASES.get(key, key)
        if key not in allowed:
            raise ConfigError(f"backbone.{key}: unknown setting for backbone {name!r}; accepted: {sorted(allowed)}")
        out[key] = value
    return out


def _check_common(out: dict) -> None:
    """Validate (and normalise ``offload``, ``guidance_scale``) the settings every adapter shares, in place."""
    if out["offload"] not in ("none", "model", "sequential", None, False):
        raise ConfigError(f"backbone.offload: expected none, model or sequential, got {out['offload']!r}")
    out["offload"] = out["offload"] or "none"
    if out["dtype"] not in ("auto", None) and str(out["dtype"]) not in DTYPES:
        raise ConfigError(f"backbone.dtype: expected auto or one of {sorted(DTYPES)}, got {out['dtype']!r}")
    if out["coords"] not in ("edm", "flow"):
        raise ConfigError(f"backbone.coords: expected 'edm' or 'flow', got {out['coords']!r}")
    if not isinstance(out["vae_batch"], int) or out["vae_batch"] < 1:
        raise ConfigError(f"backbone.vae_batch: expected a positive integer, got {out['vae_batch']!r}")
    if out["resolution"] is not None and (not isinstance(out["resolution"], int) or out["resolution"] <= 0):
        raise ConfigError(f"backbone.resolution: expected a positive integer (pixels), got {out['resolution']!r}")
    try:
        out["guidance_scale"] = float(out["guidance_scale"])
    except (TypeError, ValueError):
        raise ConfigError(f"backbone.guidance_scale: expected a number, got {out['guidance_scale']!r}") from None


def settings_from_section(name: str, section: dict | None, names: tuple[str, ...] = ()) -> dict:
    """Adapter settings from a workflow ``backbones.<key>`` section.

    ``kind`` must be ``name`` (or one of ``names``, the original's names for it); ``guidance``, ``model_path``,
    ``resolution``, ``coords`` are read from the section and everything in ``backend_config`` (our keys or the
    original's ``backend_config`` keys) overrides them. The study keys (:data:`epd.config.STUDY_KEYS`: solvers,
    nfes, student, ...) are ignored here.

    Returns:
        `dict`: input for :meth:`DiffusersSettings.from_config`.
    """
    section = dict(section or {})
    kind = section.pop("kind", name)
    if kind not in (name, *names):
        raise ConfigError(f"backbone.kind: {kind!r} given to the {name} adapter")
    section.pop("name", None)  # the section's key in the config (e.g. sd3_512), not the adapter
    extra = section.pop("backend_config", None) or {}
    if not isinstance(extra, dict):
        raise ConfigError(f"backbone.backend_config: expected a mapping, got {type(extra).__name__}")
    cfg = {k: v for k, v in section.items() if k not in STUDY_KEYS}
    if "guidance" in cfg:
        cfg["guidance_scale"] = cfg.pop("guidance")
    cfg.update(extra)
    return cfg


def resolve_dtype(setting: Any, device: str | torch.device, cuda_default: torch.dtype) -> torch.dtype:
    """``auto`` -> ``cuda_default`` on CUDA, float32 elsewhere; names and torch dtypes pass through."""
    if isinstance(setting, torch.dtype):
        return setting
    if setting in (None, "auto"):
        return cuda_default if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[str(setting)]
