"""Shared pieces of the diffusers backbone adapters (SD1.5, SD3, FLUX).

* :class:`~epd.backbones.diffusers_settings.DiffusersSettings` — typed settings, validated key by key (with the
  original ``backend_config`` aliases); each adapter subclasses it.
* :func:`check_weights_folder` — a local diffusers folder is complete and of the right architecture; one error
  lists every missing file before anything is loaded.
* :class:`DiffusersBackbone` — what every adapter shares: loading (:meth:`~DiffusersBackbone.from_pretrained`,
  :meth:`~DiffusersBackbone.from_components`, :meth:`~DiffusersBackbone.from_section`) and checking
  (:meth:`~DiffusersBackbone.check`) from what the adapter declares, deterministic noise from seeds, VAE decoding,
  the grid an EPD table asks for, and the table/config compatibility check.
* :class:`FlowDenoiser` — the flow-matching denoiser in ``"flow"`` or ``"edm"`` coordinates around a velocity.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from ..denoiser import Prepared
from ..errors import ConfigError
from .adapter import BackboneAdapter
from .diffusers_settings import STUDY_KEYS, DiffusersSettings, resolve_dtype, settings_from_section
from .weights import MissingWeightsError, resolve

__all__ = ["DiffusersSettings", "settings_from_section", "resolve_dtype", "check_weights_folder", "missing_files",
           "warn_truncation", "expand_cond", "place", "own_cpu_weights", "check_offload", "default_flow_schedule",
           "DiffusersBackbone", "FlowDenoiser", "table_value", "STUDY_KEYS"]


# ---------------------------------------------------------------------- weights folders
_MODEL_FILES = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}
# What each component folder must hold: kind -> list of alternatives (each alternative a tuple of files).
_TOKENIZER_FILES = {
    "clip_tokenizer": [("vocab.json", "merges.txt"), ("tokenizer.json",)],
    "t5_tokenizer": [("spiece.model",), ("tokenizer.json",)],
}


def _weights_present(folder: Path, kind: str, variant: str | None) -> tuple[bool, list[str]]:
    """Whether ``folder`` holds complete weights; also the shard files an index names but that are missing."""
    stems = ["diffusion_pytorch_model"] if kind == "diffusers" else ["model", "pytorch_model"]
    infix = f".{variant}" if variant else ""
    for stem in stems:
        for ext in ("safetensors", "bin"):
            if (folder / f"{stem}{infix}.{ext}").is_file():
                return True, []
            index = folder / f"{stem}{infix}.{ext}.index.json"
            if index.is_file():
                try:
                    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                except (json.JSONDecodeError, KeyError, TypeError):
                    return False, [f"{index} (unreadable shard index)"]
                missing = [str(folder / s) for s in shards if not (folder / s).is_file()]
                return not missing, missing
    return False, []


def missing_files(path: Path, layout: dict[str, str]) -> tuple[list[str], str | None]:
    """Files a diffusers folder lacks, and the weight variant (None or ``"fp16"``) that is complete."""
    path = Path(path)
    missing = [] if (path / "model_index.json").is_file() else [str(path / "model_index.json")]
    weight_kinds = {s: k for s, k in layout.items() if k in _MODEL_FILES}
    variant = None
    for cand in (None, "fp16"):
        if all(_weights_present(path / s, k, cand)[0] for s, k in weight_kinds.items()):
            variant = cand
            break
    for sub, kind in layout.items():
        folder = path / sub
        if kind in _MODEL_FILES:
            if not (folder / "config.json").is_file():
                missing.append(str(folder / "config.json"))
            ok, shard_missing = _weights_present(folder, kind, variant)
            if not ok:
                missing += shard_missing or [str(folder / f"{_MODEL_FILES[kind]}.safetensors")
                                             + " (or .bin, sharded, or .fp16 variant)"]
        elif kind == "scheduler":
            if not (folder / "scheduler_config.json").is_file():
                missing.append(str(folder / "scheduler_config.json"))
        else:
            alts = _TOKENIZER_FILES[kind]
            if not any(all((folder / f).is_file() for f in alt) for alt in alts):
                missing += [str(folder / f) for f in alts[0] if not (folder / f).is_file()]
    return missing, variant


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"weights: cannot read {p} ({e})") from None


def check_weights_folder(path: Path, name: str, layout: dict[str, str], pipeline_class: str,
                         component_classes: dict[str, str]) -> str | None:
    """Fail fast on an incomplete or wrong local diffusers folder.

    Args:
        path (`Path`): the resolved folder.
        name (`str`): backbone name for messages.
        layout (`dict`): subfolder -> kind (``diffusers``, ``transformers``, ``scheduler``, ``clip_tokenizer``,
            ``t5_tokenizer``).
        pipeline_class (`str`): expected ``_class_name`` of ``model_index.json``.
        component_classes (`dict`): subfolder -> expected ``_class_name`` of its ``config.json``.

    Returns:
        `str` or `None`: the weight variant to load (``"fp16"`` when only fp16 files are present).

    Raises:
        MissingWeightsError: listing every missing file.
        ConfigError: the folder holds another architecture.
    """
    path = Path(path)
    missing, variant = missing_files(path, layout)
    if missing:
        raise MissingWeightsError(
            f"weights for backbone {name!r} at {path} are incomplete; missing {len(missing)} file(s):\n"
            + "\n".join(f"  - {m}" for m in missing)
            + "\n  fix: complete the folder (e.g. `dvc pull data.dvc`, or copy the diffusers folder again)")
    index = _read_json(path / "model_index.json")
    found = index.get("_class_name")
    if found != pipeline_class:
        raise ConfigError(f"weights at {path}: model_index.json describes a {found}, but backbone {name!r} needs a "
                          f"{pipeline_class} folder; point backbone.model_path (or its env var) at the right weights")
    for sub, cls in component_classes.items():
        cfg = _read_json(path / sub / "config.json")
        if cfg.get("_class_name") != cls:
            raise ConfigError(f"weights at {path}/{sub}: config is a {cfg.get('_class_name')}, expected {cls} "
                              f"for backbone {name!r}")
    return variant


def check_offload(offload: str, device) -> None:
    """CPU offload moves modules to a CUDA device on demand; refuse it elsewhere before loading anything."""
    if offload != "none" and torch.device(device).type != "cuda":
        raise ConfigError(f"backbone.offload: {offload!r} CPU offload needs a CUDA device, got {device!r}; "
                          "set offload: none")


# torch's CPU allocator starts every tensor on a 64-byte boundary (c10 gAlignment); a model built in memory has only
# such tensors.
CPU_ALIGNMENT = 64


def own_cpu_weights(pipe) -> int:
    """Copy the pipeline's CPU parameters and buffers that do not start on a :data:`CPU_ALIGNMENT` boundary into
    memory of torch's allocator.

    ``from_pretrained`` leaves same-dtype safetensors weights as views of the memory-mapped file, each at
    ``8 + header length + its data offset``, i.e. at an arbitrary 4-byte-aligned address. MKL's sgemm/sgemv give
    results that depend on operand alignment on some CPUs (its SSE4.2/AVX kernels; oneMKL documents this under
    Conditional Numerical Reproducibility), so the very same weights produced other bits once loaded from a folder
    than in memory, and other bits again for another layout of the same weights (sharding, metadata). Copied,
    the weights compute like a model built in memory. Tied parameters stay tied (each object is copied once).

    Returns:
        `int`: how many tensors were copied.
    """
    n = 0
    for comp in pipe.components.values():
        if not isinstance(comp, torch.nn.Module):
            continue
        for t in (*comp.parameters(), *comp.buffers()):
            if t.device.type == "cpu" and t.data_ptr() % CPU_ALIGNMENT:
                t.data = t.data.clone()
                n += 1
    return n


def place(pipe, offload: str, device) -> None:
    """Move the pipeline's modules to ``device`` or install diffusers' CPU offload hooks.

    Weights left on the CPU (``device`` cpu) are re-homed with :func:`own_cpu_weights`, so a loaded folder computes
    bit for bit like the same modules built in memory; on a GPU the move already copies them.
    """
    if offload == "none":
        pipe.to(device)
        own_cpu_weights(pipe)
        return
    check_offload(offload, device)
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)


# ---------------------------------------------------------------------- prompts and conditioning
def check_prompts(prompts: Any) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ConfigError(f"prompts: expected a non-empty list of strings, got {type(prompts).__name__}")
    return list(prompts)


def warn_truncation(tokenizer, prompts: list[str], max_length: int, encoder: str) -> list[int]:
    """Warn (``UserWarning``) about prompts longer than ``max_length`` tokens; the pipelines truncate them.

    Returns:
        `list[int]`: indices of truncated prompts.
    """
    if tokenizer is None:
        return []
    ids = tokenizer(prompts, padding=False, truncation=False).input_ids
    long = [i for i, t in enumerate(ids) if len(t) > max_length]
    if long:
        shown = "; ".join(f"#{i} ({len(ids[i])} tokens): {prompts[i][:60]!r}" for i in long[:3])
        warnings.warn(f"prompts: {len(long)} prompt(s) exceed the {encoder} limit of {max_length} tokens and are "
                      f"truncated, as the diffusers pipeline does: {shown}{' ...' if len(long) > 3 else ''}",
                      UserWarning, stacklevel=3)
    return long


def expand_cond(cond: Prepared, m: int) -> Prepared:
    """``cond`` prepared for ``B`` samples, repeated point-major to the state batch ``m = k * B``."""
    if not isinstance(cond, Prepared):
        raise ConfigError(f"cond: expected the object returned by backbone.prepare(), got {type(cond).__name__}")
    b = cond.batch
    if b == m:
        return cond
    if m % b:
        raise ConfigError(f"cond: prepared for {b} samples, cannot serve a state batch of {m}")
    return cond.repeat(m // b)


def per_sample(sigma, x: torch.Tensor) -> torch.Tensor:
    """``sigma`` as a float64 ``(M,)`` tensor on x's device."""
    s = torch.as_tensor(sigma, device=x.device).to(torch.float64)
    return s.expand(x.shape[0]) if s.dim() == 0 else s.reshape(x.shape[0])


def bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def table_value(table, key: str):
    """Metadata ``key`` of an EPD table: attribute, then ``backbone_config`` (the original's layouts)."""
    meta = getattr(table, "meta", {}) or {}
    if meta.get(key) is not None:
        return meta[key]
    cfg = meta.get("backbone_config") or meta.get("backend_config") or {}
    return cfg.get(key)


# ---------------------------------------------------------------------- shared backbone behaviour
class DiffusersBackbone(BackboneAdapter):
    """Base of the SD1.5/SD3/FLUX adapters (see :class:`~epd.backbones.base.Backbone`).

    It carries loading and checking once (capability ``needs_weights_check``: :meth:`check` validates the local
    folder before any job loads it); each adapter declares what differs:

    Attributes:
        name (`str`): registry name (the config's ``kind``).
        Settings (`type`): the adapter's :class:`~epd.backbones.diffusers_settings.DiffusersSettings` subclass.
        pipeline_class (`str`): the diffusers pipeline class, also the ``_class_name`` its folder's
            ``model_index.json`` must name.
        pipeline_kwargs (`dict`): extra arguments of the pipeline's constructor and ``from_pretrained``.
        default_scheduler_config (`dict`): the released scheduler config (its ``_class_name`` builds the
            scheduler of :meth:`from_components`).
        default_dtype (`torch.dtype`): weights dtype on CUDA when ``dtype`` is ``auto`` (float32 on CPU).
        weights_name (`str`): entry ``("backbone", weights_name)`` of :data:`epd.backbones.weights.REGISTRY`
            (its env var, ``data/weights/`` folder and HF repo; :attr:`weights_env`).
        layout (`dict`): required folder layout, subfolder -> what it holds (see :func:`check_weights_folder`).
        component_classes (`dict`): subfolder -> ``_class_name`` its ``config.json`` must name.
        resolutions (`tuple`, *optional*): supported image sides (None: :meth:`check_folder` decides).
        title (`str`), resolution_message (`str`): how the unsupported-resolution error names the model.
        table_records_resolution (`bool`): EPD tables made for it record the image resolution they were made at.
        flow (`bool`): a rectified-flow model (noise scaling, table coordinates).

    Instances set ``denoiser``, ``latent_shape`` and implement ``prepare``, ``sigmas`` and ``sigmas_for_table``.
    """

    name = ""
    needs_weights_check = True
    Settings: type[DiffusersSettings] = DiffusersSettings
    pipeline_class = ""
    pipeline_kwargs: dict = {}
    default_scheduler_config: dict = {}
    default_dtype = torch.float16
    weights_name = ""
    layout: dict = {}
    component_classes: dict = {}
    resolutions: tuple | None = None
    resolution_message = "{title} runs at {allowed} px here, got {got}"
    title = ""
    table_records_resolution = True
    flow = False
    block_checkpointing = True
    vae = None
    settings: DiffusersSettings = DiffusersSettings()
    latent_shape: tuple = ()

    def __init__(self, pipe, settings: DiffusersSettings, device):
        self.pipe = pipe
        self.settings = settings
        self.device = torch.device(device)
        self.vae = pipe.vae
        self.scheduler_config = dict(pipe.scheduler.config)

    def weights(self):
        """The weights of every module of the pipeline (UNet/transformer, text encoders, VAE)."""
        return [p for m in self.pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters()]

    def enable_block_checkpointing(self) -> None:
        """Recompute the UNet's/transformer's activations block by block in backward passes (diffusers' gradient
        checkpointing). Same values and gradients; the peak of a backward pass through one denoiser call falls from
        the call's activations to its block boundaries (FLUX 1024: the difference between fitting 80 GB or not)."""
        network = getattr(self.pipe, "transformer", None) or self.pipe.unet
        network.enable_gradient_checkpointing()

    @property
    def vae_scale(self) -> int:
        """The VAE's downsampling factor (8 when built without a VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 8

    # ------------------------------------------------------------------ construction and checks
    @classmethod
    def parse_settings(cls, config: dict | None) -> DiffusersSettings:
        """Validated settings (see :attr:`Settings`) from a ``backbone_config`` mapping."""
        return cls.Settings.from_config(config)

    @classmethod
    def weights_env(cls) -> str | None:
        """The environment variable that may point at this backbone's weights folder."""
        from .weights import REGISTRY

        return REGISTRY[("backbone", cls.weights_name)].env

    @classmethod
    def check_folder(cls, folder: Path, settings: DiffusersSettings) -> None:
        """Adapter-specific checks of a complete folder of the right pipeline (read configs, load nothing)."""

    @classmethod
    def _check(cls, settings: DiffusersSettings, path=None) -> tuple[Path, str | None]:
        """Supported resolution, then the resolved folder: complete, of the right architecture (:meth:`check_folder`).
        Returns the folder and its weight variant."""
        if cls.resolutions is not None and settings.resolution not in cls.resolutions:
            raise ConfigError("backbone.resolution: " + cls.resolution_message.format(
                title=cls.title, allowed=list(cls.resolutions), got=settings.resolution))
        folder = resolve("backbone", cls.weights_name, explicit=path or settings.model_path)
        variant = check_weights_folder(folder, cls.name, cls.layout, cls.pipeline_class, cls.component_classes)
        cls.check_folder(folder, settings)
        return folder, variant

    @classmethod
    def check(cls, config: dict | None = None, path=None) -> Path:
        """Resolve the weights of a workflow ``backbones.<key>`` section and validate the folder (files,
        architecture) and resolution without loading them.

        Returns:
            `Path`: the weights folder. Raises ``MissingWeightsError`` listing every missing file, or ``ConfigError``.
        """
        return cls._check(cls.parse_settings(settings_from_section(cls.name, config, cls.Settings.names)), path)[0]

    @classmethod
    def from_pretrained(cls, path=None, *, config: dict | None = None, device="cpu", dtype=None):
        """Load from a local diffusers folder (never downloads).

        Args:
            path (`str`, *optional*): folder; else ``config["model_path"]``, the adapter's env var
                (:meth:`weights_env`), ``data/weights/...``, the offline HF cache
                (:func:`epd.backbones.weights.resolve`).
            config (`dict`): backbone settings (see :attr:`Settings`).
            dtype: overrides ``config["dtype"]`` (default :attr:`default_dtype` on CUDA, float32 on CPU).
        """
        import diffusers

        settings = cls.parse_settings(config)
        device = settings.device or device
        check_offload(settings.offload, device)
        folder, variant = cls._check(settings, path)
        dtype = resolve_dtype(dtype or settings.dtype, device, cls.default_dtype)
        pipe = getattr(diffusers, cls.pipeline_class).from_pretrained(
            str(folder), torch_dtype=dtype, variant=variant, local_files_only=True, **cls.pipeline_kwargs)
        place(pipe, settings.offload, device)
        return cls(pipe, settings, device)

    @classmethod
    def from_section(cls, section: dict, device="cpu", **_):
        """Load the backbone described by a workflow ``backbones.<key>`` section (adapter settings at its top level
        or in ``backend_config``) from local weights only."""
        return cls.from_pretrained(None, config=settings_from_section(cls.name, section, cls.Settings.names),
                                   device=device)

    @classmethod
    def _assemble(cls, components: dict, scheduler_config: dict | None, config: dict | None, device, dtype):
        """The adapter around already-built modules: evaluation mode on ``device`` (cast to ``dtype`` when given),
        the released scheduler (or ``scheduler_config``) and the pipeline of :attr:`pipeline_class`."""
        import diffusers

        settings = cls.parse_settings(config)
        for m in components.values():
            if isinstance(m, torch.nn.Module):
                m.eval().to(device=device, dtype=dtype) if dtype is not None else m.eval().to(device)
        sched_cls = getattr(diffusers, cls.default_scheduler_config["_class_name"])
        sched = sched_cls.from_config(scheduler_config or cls.default_scheduler_config)
        pipe = getattr(diffusers, cls.pipeline_class)(scheduler=sched, **components, **cls.pipeline_kwargs)
        return cls(pipe, settings, device)

    @property
    def coords(self) -> str:
        return self.denoiser.coords

    @property
    def sigma_min(self) -> float:
        return self.denoiser.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.denoiser.sigma_max

    @property
    def resolution(self) -> int:
        return int(self.settings.resolution)

    def noise(self, seeds: list[int], sigma: float | None = None) -> torch.Tensor:
        """Initial states: per seed ``randn(latent_shape)`` from ``torch.Generator("cpu").manual_seed(seed)`` (the
        same numbers on every device, and the same as the diffusers pipeline with one CPU generator per image).

        In EDM coordinates the draw is scaled to ``sigma`` (default ``sigma_max``): ``sigma * z`` for SD1.5 (the
        original's convention) and ``z / (1 - t)`` for a flow model started at ``t = sigma / (1 + sigma)``, which
        is the flow state ``z`` expressed in EDM coordinates. Flow coordinates: ``z`` unscaled.

        Returns:
            `torch.Tensor` float32 ``(len(seeds), *latent_shape)`` on the execution device.
        """
        if isinstance(seeds, int):
            seeds = [seeds]
        if not seeds:
            raise ConfigError("seeds: need at least one seed")
        z = torch.stack([torch.randn(self.latent_shape, generator=torch.Generator("cpu").manual_seed(int(s)))
                         for s in seeds]).to(self.device)
        return self.scale_noise(z, sigma)

    def scale_noise(self, z: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
        """A standard normal draw ``z`` as the initial state at ``sigma`` (default ``sigma_max``) in the denoiser's
        coordinates (see :meth:`noise`)."""
        if self.coords == "flow":
            return z
        s = self.sigma_max if sigma is None else float(sigma)
        return z * (1 + s) if self.flow else z * s

    # The pipeline's own latent layout (what its ``latents`` argument and ``output_type="latent"`` hold).
    pipeline_latent_dims = 4
    """Dimensions of the pipeline's latents (``(B, C, H, W)``; FLUX packs them into ``(B, L, C)``)."""

    def pipeline_latents(self, x: torch.Tensor) -> torch.Tensor:
        """States ``(B, *latent_shape)`` in the pipeline's latent layout."""
        return x

    @classmethod
    def latent_pixels(cls, shape: tuple, vae_scale: int = 8) -> int:
        """Image side in pixels of square pipeline latents of ``shape`` (the released VAEs downsample 8x)."""
        return int(shape[-1]) * vae_scale

    def from_pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The pipeline's latents as states ``(B, *latent_shape)``."""
        return latents

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in ``[0, 1]`` (float32) from final states, decoded as they are (the original
        does not denoise to 0), ``vae_batch`` at a time."""
        if self.vae is None:
            raise ConfigError(f"decode: backbone {self.name!r} was built without a VAE")
        cfg = self.vae.config
        vae_dtype = next(self.vae.parameters()).dtype
        out = []
        for chunk in torch.split(x, self.settings.vae_batch):
            lat = chunk / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
            img = self.vae.decode(lat.to(self.device, vae_dtype), return_dict=False)[0]
            out.append((img.float() / 2 + 0.5).clamp(0, 1))
        return torch.cat(out)

    def check_table(self, table, *, strict_guidance: bool = False) -> None:
        """Raise :class:`ConfigError` when an EPD table was made for another backbone, resolution or coordinates.

        The resolution is compared where tables record it (:attr:`table_records_resolution`; SD1.5 tables of the
        original record a meaningless ``img_resolution=1024``, spec §4.5). A different guidance scale warns (or
        raises with ``strict_guidance``).
        """
        meta = getattr(table, "meta", {}) or {}
        problems = []
        bb = meta.get("backbone") or meta.get("backend")
        bb = {"ldm": "sd15"}.get(bb, bb)
        if bb is not None and bb != self.name:
            problems.append(f"backbone: predictor is for {bb!r}, the config loads {self.name!r}")
        res = table_value(table, "img_resolution") or table_value(table, "resolution")
        if self.table_records_resolution and res is not None and int(res) != self.resolution:
            problems.append(f"resolution: predictor was made at {int(res)} px, backbone.resolution is "
                            f"{self.resolution}")
        coords = meta.get("coords") or ("flow" if self.flow else "edm")
        if coords != self.coords:
            problems.append(f"coords: predictor steps in {coords!r} coordinates, backbone.coords is {self.coords!r}")
        if problems:
            raise ConfigError("predictor does not match the backbone config: " + "; ".join(problems)
                              + " (use a predictor made for this backbone, or change the config)")
        rate = meta.get("guidance_rate")
        if rate is not None and abs(float(rate) - self.settings.guidance_scale) > 1e-9:
            msg = (f"predictor was tuned at guidance {rate}, backbone.guidance_scale is "
                   f"{self.settings.guidance_scale}")
            if strict_guidance:
                raise ConfigError(msg)
            warnings.warn(msg, UserWarning, stacklevel=2)

    def table_grid(self, table) -> torch.Tensor:
        """Check ``table`` against this backbone; return the grid its metadata asks for (``sigmas_for_table``)."""
        self.check_table(table)
        return self.sigmas_for_table(table)


def default_flow_schedule(settings: DiffusersSettings) -> str:
    """``backbone.schedule``, else ``flowmatch`` in flow coordinates and ``flowmatch_dpm`` (starts below t = 1) in
    EDM coordinates."""
    from ..flow_schedules import FLOW_SCHEDULES

    name = settings.schedule or ("flowmatch" if settings.coords == "flow" else "flowmatch_dpm")
    if name not in FLOW_SCHEDULES:
        raise ConfigError(f"backbone.schedule: expected one of {list(FLOW_SCHEDULES)}, got {name!r}")
    return name


class FlowDenoiser:
    """``D(x, sigma) = x_t - t * v(x_t, t)`` for a flow-matching velocity model.

    In ``"flow"`` coordinates ``sigma`` is the flow time ``t`` and ``x = x_t``; in ``"edm"`` coordinates
    ``t = sigma / (1 + sigma)`` and ``x_t = (1 - t) x = x / (1 + sigma)``. ``D`` is the clean-latent estimate in
    both. Subclasses implement ``velocity(x_t, t, cond) -> v`` (float32, same shape as ``x_t``).
    """

    coords = "flow"
    passes_per_eval = 1

    def __call__(self, x: torch.Tensor, sigma, cond: Prepared = None) -> torch.Tensor:
        s = per_sample(sigma, x)
        if self.coords == "flow":
            t, x_t = s, x
        else:
            t = s / (1 + s)
            x_t = x / bcast(1 + s, x)
        v = self.velocity(x_t, t, expand_cond(cond, x.shape[0]))
        return x_t - bcast(t, x) * v.to(x.dtype)

    @property
    def sigma_min(self) -> float:
        t = self.t_min
        return t if self.coords == "flow" else t / (1 - t)

    @property
    def sigma_max(self) -> float:
        t = self.t_max
        return t if self.coords == "flow" else t / (1 - t)
