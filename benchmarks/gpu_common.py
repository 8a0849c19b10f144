"""Shared pieces of the GPU benchmarks (``gpu_call_latency``, ``gpu_epd_step``, ``gpu_throughput``, ``gpu_all``).

Full-size SD1.5 UNet / SD3-Medium / FLUX.1-dev architectures with random weights (latency does not depend on the
weight values), built directly on the device in their CUDA dtype; random text embeddings of the real shapes
(pre-computed, as ``epd sample`` caches them). The denoisers below are the benchmarks' own minimal EDM/flow
adapters (classifier-free guidance inside, K stacked points in one call), written so that a call never
synchronises with the host and can be captured as a CUDA graph. ``--tiny`` swaps in toy configurations that run
on the CPU (eager, wall-clock timing), to smoke-test every script without a GPU.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from epd.denoiser import Prepared  # noqa: E402
from epd.io import atomic_write_json  # noqa: E402

# Architectures of the released checkpoints (config.json), random weights.
FULL = {
    "sd15": {"class": "UNet2DConditionModel", "dtype": torch.float16, "cfg": 7.5, "latent_ch": 4,
             "config": {"sample_size": 64, "cross_attention_dim": 768},  # other fields: the SD1.x defaults
             "embeds": (77, 768), "pooled": None},
    "sd3": {"class": "SD3Transformer2DModel", "dtype": torch.bfloat16, "cfg": 4.5, "latent_ch": 16,
            "config": {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24,
                       "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
                       "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "out_channels": 16,
                       "pos_embed_max_size": 192},
            "embeds": (77 + 256, 4096), "pooled": 2048},
    "flux": {"class": "FluxTransformer2DModel", "dtype": torch.bfloat16, "cfg": 3.5, "latent_ch": 16,
             "config": {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                        "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                        "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]},
             "embeds": (512, 4096), "pooled": 768},
}
TINY = {
    "sd15": {**FULL["sd15"], "dtype": torch.float32,
             "config": {"block_out_channels": (8, 16), "layers_per_block": 1, "sample_size": 8, "norm_num_groups": 4,
                        "cross_attention_dim": 16, "attention_head_dim": 2,
                        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
                        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D")}, "embeds": (77, 16)},
    "sd3": {**FULL["sd3"], "dtype": torch.float32, "latent_ch": 4,
            "config": {"sample_size": 8, "patch_size": 2, "in_channels": 4, "num_layers": 1, "attention_head_dim": 8,
                       "num_attention_heads": 2, "caption_projection_dim": 16, "joint_attention_dim": 16,
                       "pooled_projection_dim": 16, "out_channels": 4, "pos_embed_max_size": 32},
            "embeds": (24, 16), "pooled": 16},
    "flux": {**FULL["flux"], "dtype": torch.float32, "latent_ch": 4,
             "config": {"patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1,
                        "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 16,
                        "pooled_projection_dim": 16, "guidance_embeds": True, "axes_dims_rope": [4, 4, 8]},
             "embeds": (16, 16), "pooled": 16},
}
CASES = (("sd15", 512), ("sd3", 512), ("sd3", 1024), ("flux", 1024))
TINY_CASES = (("sd15", 64), ("sd3", 64), ("sd3", 128), ("flux", 128))
# timing effort per case: (warm-up, timed repeats); big models are slow and steady
EFFORT = {("sd15", 512): (10, 20), ("sd3", 512): (10, 20), ("sd3", 1024): (3, 10), ("flux", 1024): (2, 6)}
QUICK_EFFORT = {("sd15", 512): (5, 12), ("sd3", 512): (5, 12), ("sd3", 1024): (2, 6), ("flux", 1024): (1, 4)}
TINY_EFFORT = (1, 3)
SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def effort(name: str, res: int, tiny: bool, quick: bool = False) -> tuple[int, int]:
    return TINY_EFFORT if tiny else (QUICK_EFFORT if quick else EFFORT).get((name, res), (5, 10))


# ------------------------------------------------------------------------------------------- machine
def machine_info(device: torch.device) -> dict:
    """GPU name, driver and library versions for the JSON header and every row."""
    import diffusers

    info = {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda, "host": platform.node()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.split()
            info["driver"] = out[0] if out else None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
        info["gpu_count"] = torch.cuda.device_count()
    else:
        info.update(gpu=f"cpu ({platform.machine()}, tiny smoke run)", driver=None, gpu_count=0)
    return info


class Results:
    """One JSON file ``{"machine": ..., "rows": [...], "complete": bool}``, rewritten atomically per row."""

    def __init__(self, path: str | Path, benchmark: str, machine: dict, **header):
        self.path = Path(path)
        self.doc = {"benchmark": benchmark, "machine": machine, **header, "rows": [], "complete": False,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def add(self, row: dict) -> dict:
        self.doc["rows"].append(row)
        self.write()
        return row

    def write(self, complete: bool | None = None) -> None:
        if complete is not None:
            self.doc["complete"] = complete
        atomic_write_json(self.path, self.doc)


def base_row(case: "Case", machine: dict, **kw) -> dict:
    return {"backbone": case.name, "resolution": case.res, "gpu": machine["gpu"], "driver": machine["driver"],
            "torch": machine["torch"], "diffusers": machine["diffusers"], "dtype": str(case.dtype).replace("torch.", ""),
            "batch": case.B, **kw}


# ------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable, device: torch.device, warmup: int, reps: int, pre: Callable | None = None,
            barrier: Callable | None = None) -> list[float]:
    """Per-repeat milliseconds of ``fn()`` (CUDA events on GPU, wall clock on CPU).

    The queue is drained before every repeat (``pre()`` and ``barrier()`` run outside the timed region), so launch
    gaps that a real step pays are inside the measurement instead of hidden behind earlier queued work.
    """
    for _ in range(warmup):
        if pre:
            pre()
        fn()
    sync(device)
    out = []
    for _ in range(reps):
        if pre:
            pre()
        sync(device)
        if barrier:
            barrier()
        if device.type == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            out.append(e0.elapsed_time(e1))
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def med(v: list[float]) -> float:
    return float(statistics.median(v))


def summary(v: list[float]) -> dict:
    return {"median_ms": round(med(v), 4), "min_ms": round(min(v), 4), "max_ms": round(max(v), 4), "n": len(v)}


# ------------------------------------------------------------------------------------------- models
def build_model(name: str, spec: dict, device: torch.device, seed: int = 0):
    """The network with random weights, initialised directly on ``device`` in ``spec['dtype']``."""
    import diffusers

    cls = getattr(diffusers, spec["class"])
    prev = torch.get_default_dtype()
    torch.manual_seed(seed)
    torch.set_default_dtype(spec["dtype"])
    try:
        with torch.device(device):
            net = cls(**spec["config"])
    finally:
        torch.set_default_dtype(prev)
    return net.to(device=device, dtype=spec["dtype"]).eval().requires_grad_(False)


def _per_row(sigma, x: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return s.expand(x.shape[0]) if s.dim() == 0 else s


def _rows(t: torch.Tensor, m: int) -> torch.Tensor:
    """Conditioning rows for a state batch of ``m`` (repeated point-major when prepared for fewer)."""
    b = t.shape[0]
    return t if b == m else t.repeat(m // b, *([1] * (t.dim() - 1)))


class SD15EDM:
    """SD1.5 UNet as an EDM denoiser: ``x_vp = x / sqrt(1 + sigma^2)``, log-sigma-interpolated timestep, CFG."""

    coords = "edm"

    def __init__(self, unet, guidance: float, device):
        from diffusers import DDPMScheduler

        ac = DDPMScheduler(**SD_BETAS).alphas_cumprod.to(torch.float64)
        self.unet, self.g = unet, float(guidance)
        self.log_sigmas = (0.5 * torch.log((1 - ac) / ac)).to(device=device, dtype=torch.float32)
        self.passes_per_eval = 2 if self.g != 1 else 1
        self.dtype = unet.dtype

    def timestep(self, s: torch.Tensor) -> torch.Tensor:
        ls = self.log_sigmas
        x = torch.log(s.float().clamp_min(1e-10))
        hi = torch.searchsorted(ls, x).clamp(1, len(ls) - 1)
        w = ((x - ls[hi - 1]) / (ls[hi] - ls[hi - 1])).clamp(0, 1)
        return hi.float() - 1 + w

    def __call__(self, x, sigma, cond: Prepared):
        m = x.shape[0]
        s = _per_row(sigma, x)
        sv = s.reshape(-1, *([1] * (x.dim() - 1)))
        x_in = (x / torch.sqrt(1 + sv**2)).to(self.dtype)
        t = self.timestep(s)
        c, u = _rows(cond.tensors["cond"], m), _rows(cond.tensors["uncond"], m)
        if self.passes_per_eval == 2:
            eps = self.unet(torch.cat([x_in, x_in]), torch.cat([t, t]), encoder_hidden_states=torch.cat([u, c]),
                            return_dict=False)[0].float()
            eu, ec = eps.chunk(2)
            eps = eu + self.g * (ec - eu)
        else:
            eps = self.unet(x_in, t, encoder_hidden_states=c, return_dict=False)[0].float()
        return x - sv * eps.to(x.dtype)


class SD3Flow:
    """SD3 transformer as a flow denoiser ``D = x_t - t v`` (flow time as sigma), CFG ``[uncond, cond]``."""

    coords = "flow"

    def __init__(self, transformer, guidance: float):
        self.net, self.g = transformer, float(guidance)
        self.passes_per_eval = 2 if self.g != 1 else 1
        self.dtype = transformer.dtype

    def __call__(self, x, sigma, cond: Prepared):
        m = x.shape[0]
        t = _per_row(sigma, x)
        h, ts = x.to(self.dtype), (t * 1000).float()
        T = cond.tensors
        e, p = _rows(T["embeds"], m), _rows(T["pooled"], m)
        if self.passes_per_eval == 2:
            v = self.net(hidden_states=torch.cat([h, h]), timestep=torch.cat([ts, ts]),
                         encoder_hidden_states=torch.cat([_rows(T["neg_embeds"], m), e]),
                         pooled_projections=torch.cat([_rows(T["neg_pooled"], m), p]), return_dict=False)[0].float()
            vu, vc = v.chunk(2)
            v = vu + self.g * (vc - vu)
        else:
            v = self.net(hidden_states=h, timestep=ts, encoder_hidden_states=e, pooled_projections=p,
                         return_dict=False)[0].float()
        return x - t.reshape(-1, *([1] * (x.dim() - 1))) * v.to(x.dtype)


class FluxFlow:
    """FLUX transformer as a flow denoiser on packed latents ``(B, L, 64)``, embedded guidance (one pass)."""

    coords = "flow"
    passes_per_eval = 1

    def __init__(self, transformer, guidance: float, res: int, device):
        self.net, self.g = transformer, float(guidance)
        self.dtype = transformer.dtype
        h = w = res // 16
        ids = torch.zeros(h, w, 3)
        ids[..., 1] = torch.arange(h)[:, None]
        ids[..., 2] = torch.arange(w)[None, :]
        self.img_ids = ids.reshape(-1, 3).to(device=device, dtype=self.dtype)
        self._guid: dict = {}

    def __call__(self, x, sigma, cond: Prepared):
        m = x.shape[0]
        t = _per_row(sigma, x)
        if m not in self._guid:
            self._guid[m] = torch.full((m,), self.g, device=x.device, dtype=torch.float32)
        T = cond.tensors
        v = self.net(hidden_states=x.to(self.dtype), timestep=t.to(self.dtype), guidance=self._guid[m],
                     pooled_projections=_rows(T["pooled"], m), encoder_hidden_states=_rows(T["embeds"], m),
                     txt_ids=cond.extra["text_ids"], img_ids=self.img_ids, return_dict=False)[0].float()
        return x - t.reshape(-1, *([1] * (x.dim() - 1))) * v.to(x.dtype)


def make_cond(name: str, spec: dict, B: int, device, seed: int = 1) -> Prepared:
    """Random pre-computed text embeddings of the real shapes (same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    dt = spec["dtype"]

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dt)

    L, D = spec["embeds"]
    if name == "sd15":
        return Prepared({"cond": r(B, L, D), "uncond": r(B, L, D)})
    P = spec["pooled"]
    if name == "sd3":
        return Prepared({"embeds": r(B, L, D), "pooled": r(B, P), "neg_embeds": r(B, L, D), "neg_pooled": r(B, P)})
    return Prepared({"embeds": r(B, L, D), "pooled": r(B, P)},
                    {"text_ids": torch.zeros(L, 3, device=device, dtype=dt)})


def make_denoiser(name: str, model, spec: dict, res: int, device):
    if name == "sd15":
        return SD15EDM(model, spec["cfg"], device)
    if name == "sd3":
        return SD3Flow(model, spec["cfg"])
    return FluxFlow(model, spec["cfg"], res, device)


def state_shape(name: str, res: int, spec: dict) -> tuple:
    """Shape of one image's state: latents ``(C, H/8, W/8)``; FLUX packed ``(H/16 * W/16, 4 C)``."""
    if name == "flux":
        return ((res // 16) ** 2, 4 * spec["latent_ch"])
    return (spec["latent_ch"], res // 8, res // 8)


def noise(shape: tuple, seeds: list[int], device, scale: float = 1.0) -> torch.Tensor:
    """Float32 ``randn`` per seed from a CPU generator (the same on every device), as ``backbone.noise``."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]) \
        .to(device) * scale


def grid(name: str, n_points: int, device) -> torch.Tensor:
    """A decreasing grid above 0 in the denoiser's coordinates (values matter only for realism here)."""
    if name == "sd15":  # EDM polynomial (rho 7) over SD1.5's range
        smin, smax, rho = 0.0292, 14.6146, 7.0
        i = torch.arange(n_points, dtype=torch.float64) / (n_points - 1)
        s = (smax ** (1 / rho) + i * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    else:  # flow time, shift 3 (SD3's default)
        t = torch.linspace(1.0, 1.0 / n_points, n_points, dtype=torch.float64)
        s = 3 * t / (1 + 2 * t)
        s = s.clamp(max=0.999)
    return s.to(device=device, dtype=torch.float32)


def sigma_scale(name: str, sigmas: torch.Tensor) -> float:
    """Initial-noise scale at the grid's start: ``sigma_max`` in EDM coordinates, 1 in flow coordinates."""
    return float(sigmas[0]) if name == "sd15" else 1.0


@dataclass
class Case:
    """One (backbone, resolution) on one device: the network, its denoiser, conditioning and a start state."""

    name: str
    res: int
    spec: dict
    device: torch.device
    model: object
    den: object
    cond: Prepared
    B: int = 1
    dtype: torch.dtype = torch.float16
    warmup: int = 3
    reps: int = 8
    tiny: bool = False
    extra: dict = field(default_factory=dict)

    def x0(self, sigmas: torch.Tensor, seeds=None) -> torch.Tensor:
        seeds = seeds or list(range(self.B))
        return noise(state_shape(self.name, self.res, self.spec), seeds, self.device, sigma_scale(self.name, sigmas))


def make_case(name: str, res: int, device, *, tiny: bool, B: int = 1, model=None, spec_override: dict | None = None,
              quick: bool = False):
    spec = dict((TINY if tiny else FULL)[name])
    if spec_override:
        spec.update(spec_override)
    model = model if model is not None else build_model(name, spec, device)
    wu, reps = effort(name, res, tiny, quick)
    return Case(name, res, spec, torch.device(device), model, make_denoiser(name, model, spec, res, device),
                make_cond(name, spec, B, device), B=B, dtype=spec["dtype"], warmup=wu, reps=reps, tiny=tiny)


def free(*objs) -> None:
    import gc

    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def env_summary() -> dict:
    keep = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS", "CUDA_VISIBLE_DEVICES")
    return {k: os.environ.get(k) for k in keep}


def fmt(v, nd=2):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) and math.isfinite(v) else str(v))
