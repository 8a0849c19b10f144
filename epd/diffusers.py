"""Use an EPD table inside stock diffusers pipelines (``StableDiffusionPipeline``, ``StableDiffusion3Pipeline``,
``FluxPipeline``).

Two ways, the same sampler (the step pieces of :mod:`epd.solvers.epd`, the grid the backbone adapters give a table):

* :class:`EPDScheduler` — a diffusers scheduler: ``pipe.scheduler = EPDScheduler.from_table(path)``. The pipeline
  stays unmodified and evaluates the ``K`` points of each step one after another, as diffusers' Heun scheduler does
  its second evaluation: each step lists ``K + 1`` timesteps (the probe at ``sigma_n``, then each point's time
  input) and :meth:`EPDScheduler.step` keeps the step's state between the calls, returning the next point to
  evaluate and, after the last point, the next grid state. ``(K + 1) (N - 1)`` sequential model calls.
* :func:`apply_epd` — the pipeline's own components and guidance through the project's backbone adapters, the ``K``
  points of a step stacked in one denoiser call (``2 (N - 1)`` sequential calls; what makes EPD's extra
  evaluations cheap on a GPU).

A table of ``N`` grid points runs ``num_inference_steps = N - 1``; its grid is the one its metadata names
(``sigmas_for_table`` of the backbone adapters: SD1.5 ``discrete``, SD3 ``flowmatch`` with the static shift, FLUX
``flowmatch`` with the pipeline's ``mu``). The EPD state is kept in float32 whatever the pipeline's dtype.
With an analytic-first-step (``afs``) table the scheduler path still lets the pipeline evaluate the initial noise
once (the pipeline always evaluates the state it holds) and ignores that result: one call more than ``epd sample``,
the same latents.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import diffusers  # the package, not this module (absolute import)
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from .backbones import KINDS, backbone_class
from .backbones.diffusers_common import DiffusersBackbone, bcast, check_prompts, table_value
from .backbones.sd15 import SD15Denoiser, alphas_cumprod_from_config
from .errors import ConfigError
from .flow_schedules import flux_sigmas, sd3_sigmas
from .predictor import load as load_table
from .schedules import VPTable, discrete_vp
from .solvers.common import check_sigmas, sig
from .solvers.epd import (EPDOptions, ab_direction, check_table_grid, epd_combine, epd_points, probe_direction,
                          require_table, sample_epd, table_row)
from .table import EPDTable

__all__ = ["EPDScheduler", "apply_epd", "EPDPipeline", "EPDPipelineOutput", "SCHEDULER_KEYS"]

# Keys of a pipeline's scheduler config the EPD scheduler keeps (the pipelines read some of them, e.g. FLUX's mu).
SCHEDULER_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "shift", "use_dynamic_shifting",
                  "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")


# ---------------------------------------------------------------------------------------------- the table
def _read_table(table) -> EPDTable:
    require_table(table)
    return table if isinstance(table, EPDTable) else load_table(table)


def _kind(table: EPDTable, backbone: str | None = None) -> str:
    """The diffusers backbone a table is for (its metadata, or ``backbone`` when the metadata names none)."""
    meta = table.meta or {}
    kind = meta.get("backbone") or meta.get("backend") or backbone
    kind = {"ldm": "sd15"}.get(kind, kind)
    if kind is None:
        raise ConfigError("table: its metadata names no backbone; pass backbone='sd15', 'sd3' or 'flux'")
    if backbone is not None and {"ldm": "sd15"}.get(backbone, backbone) != kind:
        raise ConfigError(f"backbone: the table is for {kind!r}, not {backbone!r}")
    if kind not in KINDS or not issubclass(backbone_class(kind), DiffusersBackbone):
        raise ConfigError(f"backbone: the table is for {kind!r}, which has no diffusers pipeline; diffusers tables "
                          "are for 'sd15', 'sd3' or 'flux'")
    return kind


def _table_to_config(table: EPDTable) -> dict:
    """The table as JSON values (float64 lists round-trip exactly), stored in the scheduler's config."""
    out = {k: (None if v is None else v.tolist()) for k, v in
           (("positions", table.positions), ("weights", table.weights), ("scale_dir", table.scale_dir),
            ("scale_time", table.scale_time))}
    out["meta"] = json.loads(json.dumps(table.meta, default=str))
    out["provenance"] = json.loads(json.dumps(table.provenance, default=str))
    return out


def _table_from_config(doc: dict | None) -> EPDTable:
    if not isinstance(doc, dict) or "positions" not in doc or "weights" not in doc:
        raise ConfigError("table: EPDScheduler needs an EPD table; build it with EPDScheduler.from_table(path) "
                          "or load a folder written by its save_pretrained")
    return EPDTable(doc["positions"], doc["weights"], doc.get("scale_dir"), doc.get("scale_time"),
                    meta=dict(doc.get("meta") or {}), provenance=dict(doc.get("provenance") or {}))


def _steps_error(N: int, got) -> ConfigError:
    return ConfigError(f"num_inference_steps: the EPD table has N={N} grid points, i.e. {N - 1} steps; call the "
                       f"pipeline with num_inference_steps={N - 1} (got {got})")


# ---------------------------------------------------------------------------------------------- the scheduler
class EPDScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler that samples with an EPD table (see the module docstring).

    Build it with :meth:`from_table`; :meth:`save_pretrained` writes a scheduler folder whose
    ``scheduler_config.json`` holds the table, :meth:`from_pretrained` reads it back.

    Args:
        table (`dict`): the table as :meth:`from_table` stores it (tensors as lists, metadata).
        backbone (`str`): ``sd15``, ``sd3`` or ``flux`` (from the table's metadata).
        plugin (`str`, *optional*): ``"ipndm"`` for EPD-Plugin (Adams-Bashforth probe direction).
        max_order (`int`, *optional*): the plugin's order (default: the table's ``max_order`` or 4).
        timestep_mode (`str`): SD1.5's UNet time input (see :mod:`epd.backbones.sd15`).
        num_train_timesteps, beta_start, beta_end, beta_schedule, shift, use_dynamic_shifting, base_shift,
        max_shift, base_image_seq_len, max_image_seq_len: the pipeline's scheduler settings (the released ones
        by default), which set the model's noise levels and the grid.
    """

    _compatibles: list = []
    order = 1  # per instance: K + 1 evaluations per step

    @register_to_config
    def __init__(self, table: dict | None = None, backbone: str | None = None, plugin: str | None = None,
                 max_order: int | None = None, timestep_mode: str = "continuous", num_train_timesteps: int = 1000,
                 beta_start: float = 0.00085, beta_end: float = 0.012, beta_schedule: str = "scaled_linear",
                 shift: float = 3.0, use_dynamic_shifting: bool = False, base_shift: float = 0.5,
                 max_shift: float = 1.15, base_image_seq_len: int = 256, max_image_seq_len: int = 4096):
        self.table = _table_from_config(table)
        self.kind = _kind(self.table, backbone)
        self.adapter = backbone_class(self.kind)
        coords = self.table.meta.get("coords") or ("flow" if self.adapter.flow else "edm")
        if coords != ("flow" if self.adapter.flow else "edm"):
            raise ConfigError(f"coords: the table steps in {coords!r} coordinates; in a {self.adapter.pipeline_class} "
                              f"the scheduler steps in the model's own ({'flow' if self.adapter.flow else 'edm'!r})")
        self.opts = EPDOptions.resolve(self.table, afs=None, plugin=plugin, max_order=max_order)
        self.K = self.table.num_points
        self.order = self.K + 1
        self._time = None if self.adapter.flow else SD15Denoiser(
            None, alphas_cumprod_from_config(dict(self.config)), 1.0, timestep_mode).timestep
        self.init_noise_sigma = 1.0
        self.timesteps = self.sigmas = self.num_inference_steps = None
        self._reset()

    @classmethod
    def from_table(cls, table, scheduler_config: dict | None = None, *, plugin: str | None = None,
                   max_order: int | None = None, backbone: str | None = None) -> "EPDScheduler":
        """The scheduler of an EPD table.

        Args:
            table: a path (ours: ``.safetensors``/``.json``; the original's ``.pkl`` or run folder, read through the
                allow-list unpickler) or an :class:`~epd.table.EPDTable`.
            scheduler_config (`dict`, *optional*): the pipeline's scheduler config (``pipe.scheduler.config``);
                default: the released one of the table's backbone.
            backbone (`str`, *optional*): for a table whose metadata names none.
        """
        tab = _read_table(table)
        kind = _kind(tab, backbone)
        cfg = {**backbone_class(kind).default_scheduler_config, **dict(scheduler_config or {})}
        kw = {k: cfg[k] for k in SCHEDULER_KEYS if cfg.get(k) is not None}
        return cls(table=_table_to_config(tab), backbone=kind, plugin=plugin, max_order=max_order, **kw)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def _reset(self) -> None:
        self._step_index = self._begin_index = None
        self._scaled = False
        self._x = None
        self._state: dict = {}
        self._history: list = []

    # ------------------------------------------------------------------ the grid
    def table_grid(self, mu: float | None = None) -> torch.Tensor:
        """The table's ``N`` grid points (float64) in its coordinates, as the backbone adapter's
        ``sigmas_for_table`` makes them; ``mu``: the pipeline's FLUX shift. A grid the pipeline's settings
        contradict (another ``mu`` or ``shift``) raises :class:`~epd.errors.ConfigError`."""
        table, cfg, N = self.table, self.config, self.table.num_steps
        schedule = table_value(table, "schedule_type") or ("flowmatch" if self.adapter.flow else "discrete")
        if not self.adapter.flow:
            if mu is not None:
                raise ConfigError(f"mu: the table is for {self.kind!r} ({self.adapter.pipeline_class}), which has no "
                                  "time shift; is the pipeline a FluxPipeline? (use a table made for its model)")
            if schedule != "discrete":
                raise ConfigError(f"schedule_type: the scheduler runs SD1.5 tables on the 'discrete' grid, the table "
                                  f"has {schedule!r}; use apply_epd for it")
            vp = VPTable(alphas_cumprod_from_config(dict(cfg)))
            return discrete_vp(N, vp, table_value(table, "sigma_min"), table_value(table, "sigma_max"),
                               table_value(table, "schedule_rho") or 1.0)
        if schedule != "flowmatch":
            raise ConfigError(f"schedule_type: a flow table's grid must end above 0 ('flowmatch'), got {schedule!r}")
        if cfg.use_dynamic_shifting:
            return flux_sigmas(N, self._mu(mu), schedule, cfg.num_train_timesteps)
        if mu is not None:
            raise ConfigError(f"mu: the table is for {self.kind!r} ({self.adapter.pipeline_class}, static shift), but "
                              "the pipeline passes a dynamic shift mu; is it a FluxPipeline? (use a table made for "
                              "its model)")
        shift = table_value(table, "flowmatch_shift")
        if shift is not None and abs(float(shift) - cfg.shift) > 1e-9:
            raise ConfigError(f"shift: the table was made with shift {shift}, the scheduler config has {cfg.shift}")
        return sd3_sigmas(N, cfg.shift, schedule, cfg.num_train_timesteps)

    def _mu(self, mu) -> float:
        if mu is None:
            raise ConfigError(f"mu: the {self.kind!r} table's grid needs the pipeline's dynamic shift mu, which "
                              f"{self.adapter.pipeline_class} passes; is the pipeline another one? (or pass mu=...)")
        have = table_value(self.table, "flowmatch_mu")
        if have is not None and abs(float(have) - float(mu)) > 1e-6:
            res = table_value(self.table, "img_resolution")
            raise ConfigError(f"mu: the table was made with mu={have} ({res} px), the pipeline asks for mu={mu:.4f}: "
                              "run the pipeline at the table's resolution (height/width)")
        return float(mu)

    def _check_sigmas_arg(self, sigmas, grid: torch.Tensor) -> int:
        """Steps of a ``sigmas`` argument: FluxPipeline's default ``linspace(1, 1/n, n)`` (its values replaced by
        the table's grid) or the table's own grid; other values would not be the grid the table was made for."""
        s = torch.as_tensor(sigmas if not hasattr(sigmas, "tolist") else sigmas.tolist(), dtype=torch.float64)
        n = len(s)
        default = torch.linspace(1.0, 1.0 / max(n, 1), n, dtype=torch.float64)
        if torch.allclose(s, default, rtol=0, atol=1e-9):
            return n
        if s.shape == grid.shape and torch.allclose(s, grid, rtol=1e-6, atol=0):
            return n - 1
        raise ConfigError(f"sigmas: an EPD table fixes its grid ({len(grid)} points: "
                          f"{[round(v, 5) for v in grid.tolist()]}); leave sigmas unset or pass those values")

    def _evaluation_sigmas(self, grid: torch.Tensor) -> torch.Tensor:
        """``(N - 1, K + 1)`` float32 noise levels of each step's evaluations: ``sigma_n``, then each point's time
        input ``a_k s_k`` (from :func:`~epd.solvers.epd.epd_points`, as the solver computes them)."""
        x = torch.zeros(1, 1)
        rows = []
        for n in range(len(grid) - 1):
            s, t = sig(grid, n, x), sig(grid, n + 1, x)
            row = table_row(self.table, n, x, 1)
            s_k, _ = epd_points(x, x, s, t, row)
            rows.append(torch.cat([s.reshape(1), (row["scale_time"] * s_k)[0]]))
        return torch.stack(rows)

    def _model_time(self, s: torch.Tensor) -> torch.Tensor:
        """The model's time input of noise levels ``s``, as the adapters' denoisers compute it."""
        if self.adapter.flow:
            return (s.double() * self.config.num_train_timesteps).float()
        return self._time(s.double()).float()

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu: float | None = None,
                      timesteps=None) -> None:
        """The ``(K + 1) (N - 1)`` evaluation times of the table's grid (``num_inference_steps`` must be ``N - 1``).

        ``sigmas``: FluxPipeline's default (only its length is used) or the table's grid; ``mu``: FLUX's shift."""
        if timesteps is not None:
            raise ConfigError("timesteps: an EPD table fixes its grid; leave timesteps unset")
        N = self.table.num_steps
        grid = self.table_grid(mu)
        steps = num_inference_steps if sigmas is None else self._check_sigmas_arg(sigmas, grid)
        if steps != N - 1:
            raise _steps_error(N, steps)
        check_table_grid(self.table, grid)
        self.sigmas = grid
        self._grid = check_sigmas(grid.to(torch.float32), allow_final_zero=False)
        self._evals = self._evaluation_sigmas(self._grid).reshape(-1)
        self.timesteps = self._model_time(self._evals).to(device)
        self.init_noise_sigma = 1.0 if self.adapter.flow else float(grid[0])
        self.num_inference_steps = N - 1
        self._reset()

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    @property
    def step_index(self) -> int | None:
        return self._step_index

    def _index(self) -> int:
        if self.timesteps is None:
            raise ConfigError("EPDScheduler: call set_timesteps before sampling (the pipeline does)")
        if self._step_index is None:
            self._step_index = self._begin_index or 0
        return self._step_index

    # ------------------------------------------------------------------ the step
    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """SD1.5 (EDM coordinates): the UNet's input ``x / sqrt(1 + sigma^2)`` at the current evaluation; flow
        models take the state itself (their pipelines do not call this)."""
        i = self._index()
        self._scaled = True
        if self.adapter.flow or i >= len(self._evals):
            return sample
        s = self._evals[i].to(sample.device).double()
        return (sample.float() / torch.sqrt(1 + s**2).float()).to(sample.dtype)

    def _check_pipeline(self, sample: torch.Tensor) -> None:
        """At the first call: the pipeline is of the table's family (SD1.5 pipelines scale the model input, SD3
        and FLUX pipelines do not; FLUX packs its latents)."""
        want = self.adapter.pipeline_class
        if self._scaled == self.adapter.flow:
            did = "calls" if self._scaled else "does not call"
            raise ConfigError(f"pipeline: the EPD table is for {self.kind!r} ({want}), but this pipeline {did} "
                              "scheduler.scale_model_input; use the table in a " + want)
        if sample.dim() != self.adapter.pipeline_latent_dims:
            raise ConfigError(f"pipeline: the EPD table is for {self.kind!r} ({want}, latents of "
                              f"{self.adapter.pipeline_latent_dims} dims), got latents of shape "
                              f"{tuple(sample.shape)}; use the table in a " + want)
        res = table_value(self.table, "img_resolution")
        if self.adapter.table_records_resolution and res is not None:
            px = self.adapter.latent_pixels(tuple(sample.shape))
            if px != int(res):
                raise ConfigError(f"resolution: the table was made at {int(res)} px, the pipeline samples {px} px "
                                  f"(latents {tuple(sample.shape[1:])}); call it with height=width={int(res)}")

    def _denoised(self, model_output: torch.Tensor, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``D(x, s)`` from the model's output: ``x - s eps`` (SD1.5, EDM) or ``x - t v`` (flow)."""
        return x - bcast(s, x) * model_output.to(x.dtype)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, **_):
        """One evaluation's result: the next state the pipeline evaluates (a point of the step, or the next grid
        state after the step's last point)."""
        i = self._index()
        if i >= len(self._evals):
            raise ConfigError(f"step: the EPD grid has {len(self._evals)} evaluations and all were made; call "
                              "set_timesteps again to sample anew")
        if i == 0:
            self._check_pipeline(sample)
        n, j = divmod(i, self.K + 1)
        out = self._probe(n, model_output, sample) if j == 0 else self._point(j - 1, model_output)
        self._step_index = i + 1
        out = out.to(sample.dtype)
        return SchedulerOutput(prev_sample=out) if return_dict else (out,)

    def _probe(self, n: int, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        x = sample.float() if n == 0 else self._x
        s, t = sig(self._grid, n, x), sig(self._grid, n + 1, x)
        den = self._denoised(model_output, x, s)
        d = probe_direction(lambda *_: den, x, s, None, analytic=self.opts.afs and n == 0)
        if self.opts.plugin:
            d, self._history = ab_direction(d, self._history, self.opts.max_order)
        row = table_row(self.table, n, x, x.shape[0])
        s_k, y = epd_points(x, d, s, t, row)
        self._state = {"x": x, "s": s, "t": t, "row": row, "s_k": s_k, "y": y, "s_in": row["scale_time"] * s_k,
                       "den": []}
        return y[:, 0]

    def _point(self, k: int, model_output: torch.Tensor) -> torch.Tensor:
        st = self._state
        st["den"].append(self._denoised(model_output, st["y"][:, k], st["s_in"][:, k]))
        if k + 1 < self.K:
            return st["y"][:, k + 1]
        den = torch.stack(st["den"], 1)
        self._x = epd_combine(st["x"], st["s"], st["t"], st["y"], st["s_k"], den, st["row"])
        return self._x


# ---------------------------------------------------------------------------------------------- batched wrapper
@dataclass
class EPDPipelineOutput:
    """Images (or latents) of :class:`EPDPipeline` and its evaluation counts (see
    :class:`~epd.solvers.common.SolverOutput`)."""

    images: Any
    nfe: int
    forward_passes: int
    paper_nfe: int


class EPDPipeline:
    """A diffusers pipeline sampled with an EPD table through the backbone adapter around its own components (its
    text encoders, classifier-free guidance, VAE), the ``K`` points of each step in one denoiser call.

    Call it like the pipeline: ``prompt``, ``negative_prompt``, ``height``/``width`` (square), ``guidance_scale``
    (default: the table's ``guidance_rate``, else the adapter's), ``num_inference_steps`` (must be ``N - 1`` when
    given), ``generator``, ``latents`` (the pipeline's layout, unscaled), ``max_sequence_length``, ``output_type``
    (``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``: the pipeline's latent layout).
    """

    def __init__(self, pipe, table, *, plugin: str | None = None, max_order: int | None = None):
        self.pipe = pipe
        self.table = _read_table(table)
        self.kind = _kind(self.table)
        self.adapter = backbone_class(self.kind)
        want = getattr(diffusers, self.adapter.pipeline_class)
        if not isinstance(pipe, want):
            raise ConfigError(f"pipe: the EPD table is for {self.kind!r} ({want.__name__}), got a "
                              f"{type(pipe).__name__}; use a table made for this pipeline's model")
        self.plugin, self.max_order = plugin, max_order

    def backbone(self, height: int | None = None, width: int | None = None, guidance_scale: float | None = None,
                 max_sequence_length: int | None = None) -> DiffusersBackbone:
        """The backbone adapter around the pipeline's components for one call's settings."""
        p = self.pipe
        res = height or width or p.default_sample_size * p.vae_scale_factor
        if height and width and height != width:
            raise ConfigError(f"height/width: apply_epd samples square images, got {height}x{width}")
        cfg = {"resolution": int(res)}
        rate = guidance_scale if guidance_scale is not None else self.table.meta.get("guidance_rate")
        if rate is not None:
            cfg["guidance_scale"] = float(rate)
        if max_sequence_length is not None:
            cfg["max_sequence_length"] = int(max_sequence_length)
        return self.adapter(p, self.adapter.parse_settings(cfg), p._execution_device)

    def _noise(self, bb: DiffusersBackbone, batch: int, generator, latents) -> torch.Tensor:
        """The pipeline's draw (``randn_tensor`` in its dtype) or its ``latents``, as states of the adapter."""
        if latents is None:
            from diffusers.utils.torch_utils import randn_tensor

            z = randn_tensor((batch, *bb.latent_shape), generator=generator, device=bb.device, dtype=self.pipe.dtype)
            return z.float()
        z = bb.from_pipeline_latents(latents.to(bb.device).float())
        if z.shape != (batch, *bb.latent_shape):
            raise ConfigError(f"latents: expected {batch} x {tuple(bb.latent_shape)} (after unpacking), got "
                              f"{tuple(z.shape)}")
        return z

    @torch.no_grad()
    def __call__(self, prompt, negative_prompt=None, *, height: int | None = None, width: int | None = None,
                 guidance_scale: float | None = None, num_inference_steps: int | None = None, generator=None,
                 latents: torch.Tensor | None = None, max_sequence_length: int | None = None,
                 output_type: str = "pil") -> EPDPipelineOutput:
        bb = self.backbone(height, width, guidance_scale, max_sequence_length)
        sigmas = bb.table_grid(self.table)
        if num_inference_steps is not None and num_inference_steps != len(sigmas) - 1:
            raise _steps_error(len(sigmas), num_inference_steps)
        prompts = check_prompts(prompt)
        cond = bb.prepare(prompts, negative_prompt)
        x = bb.scale_noise(self._noise(bb, len(prompts), generator, latents), float(sigmas[0]))
        out = sample_epd(bb.denoiser, x, sigmas.to(x.dtype), cond=cond, table=self.table, plugin=self.plugin,
                         max_order=self.max_order)
        return EPDPipelineOutput(self._output(bb, out.x, output_type), out.nfe, out.forward_passes, out.paper_nfe)

    def _output(self, bb: DiffusersBackbone, x: torch.Tensor, output_type: str):
        if output_type == "latent":
            return bb.pipeline_latents(x)
        if output_type not in ("pt", "np", "pil"):
            raise ConfigError(f"output_type: expected 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        img = bb.decode(x)
        if output_type == "pt":
            return img
        arr = self.pipe.image_processor.pt_to_numpy(img)
        return arr if output_type == "np" else self.pipe.image_processor.numpy_to_pil(arr)


def apply_epd(pipe, table, *, plugin: str | None = None, max_order: int | None = None) -> EPDPipeline:
    """``pipe`` sampled with an EPD table, the ``K`` points of each step stacked in one denoiser call.

    Args:
        pipe: a ``StableDiffusionPipeline``, ``StableDiffusion3Pipeline`` or ``FluxPipeline`` (its components are
            used as they are: device, dtype, offload hooks).
        table: a table path (ours or the original's ``.pkl``) or an :class:`~epd.table.EPDTable`.
        plugin (`str`, *optional*): ``"ipndm"`` for EPD-Plugin.

    Returns:
        :class:`EPDPipeline`: call it like the pipeline; ``.images`` of its output as the pipeline's.
    """
    return EPDPipeline(pipe, table, plugin=plugin, max_order=max_order)
