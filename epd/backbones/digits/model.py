"""The embedded default backbone: a class-conditional EDM denoiser on scikit-learn's bundled digits.

Everything here runs on a CPU in minutes and needs no download:

* :func:`load_split` — ``sklearn.datasets.load_digits`` (1797 8×8 images), a seeded stratified split into train
  and held-out sets, pixels mapped to ``[-1, 1]``, optional integer (nearest) upsampling.
* :class:`DigitsUNet` — a small conv U-Net conditioned on the noise level and the class (adaptive GroupNorm),
  with an extra null class for classifier-free guidance (label dropout during training).
* :class:`EDMPrecond` — Karras et al. (2022) preconditioning (``sigma_data = 0.5``, ``c_noise = ln(sigma) / 4``).
* :class:`DigitsDenoiser` — the :class:`~epd.backbones.base.Denoiser` adapter: CFG inside, K stacked points.
* :class:`DigitsBackbone` — the :class:`~epd.backbones.base.Backbone`: prompts → labels, seeded noise, EDM
  sigma grids, images.
* :func:`save_model` / :func:`load_model` — ``model.safetensors`` + ``model.json`` with checks that name the file.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import ConfigError, EPDError
from ...io import atomic_path, atomic_write_json, config_hash, sha256_file

__all__ = [
    "NUM_CLASSES", "NULL_CLASS", "SIGMA_DATA", "PROMPTS", "parse_prompt", "parse_prompts", "DigitsSplit",
    "load_split", "DigitsUNet", "EDMPrecond", "DigitsDenoiser", "DigitsBackbone", "edm_sigmas",
    "save_model", "load_model", "read_meta", "load_safetensors_checked", "DEFAULT_ARCH",
]

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # label used for the unconditional branch of classifier-free guidance
SIGMA_DATA = 0.5
BASE_RES = 8
FORMAT = "epd-digits-denoiser"
FORMAT_VERSION = 1

# --------------------------------------------------------------------------------------------------------------
# Prompts.

_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PROMPTS = [f"a handwritten digit {w}" for w in _WORDS]
ACCEPTED_FORMS = "'7', 'seven', 'digit 7', 'digit seven', 'a handwritten digit seven' (any digit 0-9, any case)"
_PROMPT_RE = re.compile(r"^(?:(?:a|an|the)\s+)?(?:handwritten\s+)?(?:(?:digit|number)\s+)?(\w+)$")


def parse_prompt(text: str) -> int:
    """Map a text prompt to a digit label.

    Args:
        text (`str`): e.g. ``"7"``, ``"seven"``, ``"digit 7"``, ``"a handwritten digit seven"`` (case-insensitive;
            surrounding spaces and a final period are ignored).

    Returns:
        `int`: the label in ``0..9``.

    Raises:
        EPDError: for anything else, listing the accepted forms.
    """
    if not isinstance(text, str):
        raise EPDError(f"prompt {text!r}: expected text; accepted forms: {ACCEPTED_FORMS}")
    norm = " ".join(text.strip().lower().rstrip(".").split())
    m = _PROMPT_RE.match(norm)
    if m:
        word = m.group(1)
        if word.isdigit() and len(word) == 1:
            return int(word)
        if word in _WORDS:
            return _WORDS.index(word)
    raise EPDError(f"prompt {text!r} is not a digit prompt; accepted forms: {ACCEPTED_FORMS}")


def parse_prompts(prompts: list[str]) -> torch.Tensor:
    """Labels ``(B,)`` (int64) for a list of prompts (see :func:`parse_prompt`)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    return torch.tensor([parse_prompt(p) for p in prompts], dtype=torch.long)


def check_labels(labels: torch.Tensor, what: str = "labels") -> torch.Tensor:
    """Validate integer class labels in ``0..9``."""
    labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dim() != 1:
        raise EPDError(f"{what}: expected a 1-D integer tensor of digit labels, got {labels.dtype} "
                       f"of shape {tuple(labels.shape)}")
    bad = labels[(labels < 0) | (labels >= NUM_CLASSES)]
    if bad.numel():
        raise EPDError(f"{what}: label {int(bad[0])} out of range; digit labels are 0..{NUM_CLASSES - 1}")
    return labels.long()


# --------------------------------------------------------------------------------------------------------------
# Data.

@dataclass
class DigitsSplit:
    """A train/held-out split of the digits, images ``(N, 1, H, W)`` float32 in ``[-1, 1]``, labels int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_heldout: torch.Tensor
    y_heldout: torch.Tensor

    @property
    def resolution(self) -> int:
        return self.x_train.shape[-1]


def load_split(seed: int = 0, n_heldout: int = 297, upsample: int = 1) -> DigitsSplit:
    """Load scikit-learn's bundled digits and split them, stratified by class, with a fixed seed.

    Args:
        seed (`int`): ``random_state`` of the stratified split.
        n_heldout (`int`): number of held-out images (the rest is the train split).
        upsample (`int`): integer nearest-neighbour upsampling factor (1 keeps 8×8, 2 gives 16×16).

    Returns:
        :class:`DigitsSplit`.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not isinstance(upsample, int) or upsample < 1:
        raise ConfigError(f"upsample: expected an integer >= 1, got {upsample!r}")
    d = load_digits()
    if not 10 <= n_heldout <= len(d.target) - 10:
        raise ConfigError(f"n_heldout: expected 10..{len(d.target) - 10}, got {n_heldout}")
    idx_tr, idx_ho = train_test_split(range(len(d.target)), test_size=n_heldout, random_state=seed,
                                      stratify=d.target)
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    if upsample > 1:
        x = x.repeat_interleave(upsample, -1).repeat_interleave(upsample, -2)
    y = torch.tensor(d.target, dtype=torch.long)
    tr, ho = torch.tensor(idx_tr), torch.tensor(idx_ho)
    return DigitsSplit(x[tr].contiguous(), y[tr], x[ho].contiguous(), y[ho])


def to_base_resolution(images: torch.Tensor) -> torch.Tensor:
    """Images ``(B, C, H, W)`` in ``[0, 1]`` (grey or RGB) to ``(B, 1, 8, 8)`` in ``[-1, 1]`` (channel mean,
    area downsampling by the integer factor ``H / 8``)."""
    if images.dim() != 4 or images.shape[-1] != images.shape[-2] or images.shape[-1] % BASE_RES:
        raise EPDError(f"images: expected (B, C, H, H) with H a multiple of {BASE_RES}, got {tuple(images.shape)}")
    x = images.float().mean(1, keepdim=True) * 2 - 1
    f = x.shape[-1] // BASE_RES
    return F.avg_pool2d(x, f) if f > 1 else x


# --------------------------------------------------------------------------------------------------------------
# Network.

DEFAULT_ARCH = {
    "resolution": 8, "channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attention": True,
    "emb_dim": 128, "dropout": 0.1,
}


def _groups(ch: int) -> int:
    return math.gcd(8, ch)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        return self.skip(x) + self.conv2(self.drop(h))


class _Attention(nn.Module):
    def __init__(self, ch: int, heads: int = 1):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        self.heads = heads
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3 * self.heads, c // self.heads, h * w).transpose(-1, -2).chunk(3, 1)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class DigitsUNet(nn.Module):
    """A small U-Net ``F(x_in, c_noise, label)`` with adaptive GroupNorm conditioning.

    Args:
        resolution (`int`): image size (8, or 8 × upsample).
        channels (`int`): width of the first level; level ``l`` has ``channels * channel_mult[l]``.
        channel_mult (`list[int]`): one entry per resolution level (each level halves the size).
        num_res_blocks (`int`): residual blocks per level on the way down (one more on the way up).
        attention (`bool`): self-attention at the lowest resolution (global context for the whole digit).
        emb_dim (`int`): width of the noise-level + class embedding.
        dropout (`float`): dropout inside residual blocks (regularises against memorising 1500 images).
    """

    def __init__(self, resolution: int = 8, channels: int = 32, channel_mult=(1, 2), num_res_blocks: int = 1,
                 attention: bool = True, emb_dim: int = 128, dropout: float = 0.1):
        super().__init__()
        if resolution % (2 ** (len(channel_mult) - 1)):
            raise ConfigError(f"arch: resolution {resolution} is not divisible by 2^(levels-1) for "
                              f"channel_mult {list(channel_mult)}")
        self.resolution = resolution
        self.register_buffer("freqs", torch.exp(-math.log(1e4) * torch.arange(16) / 16))
        self.noise_mlp = nn.Sequential(nn.Linear(32, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(NUM_CLASSES + 1, emb_dim)
        chs = [channels * m for m in channel_mult]
        self.conv_in = nn.Conv2d(1, chs[0], 3, padding=1)
        self.down = nn.ModuleList()
        skips, ch = [chs[0]], chs[0]
        for lvl, c in enumerate(chs):
            for _ in range(num_res_blocks):
                self.down.append(_ResBlock(ch, c, emb_dim, dropout))
                ch = c
                skips.append(ch)
            if lvl < len(chs) - 1:
                self.down.append(nn.AvgPool2d(2))
                skips.append(ch)
        self.mid1 = _ResBlock(ch, ch, emb_dim, dropout)
        self.attn = _Attention(ch) if attention else nn.Identity()
        self.mid2 = _ResBlock(ch, ch, emb_dim, dropout)
        self.up = nn.ModuleList()
        for lvl, c in reversed(list(enumerate(chs))):
            for _ in range(num_res_blocks + 1):
                self.up.append(_ResBlock(ch + skips.pop(), c, emb_dim, dropout))
                ch = c
            if lvl > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.conv_out = nn.Conv2d(ch, 1, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ang = c_noise[:, None] * self.freqs[None] * 100.0
        emb = self.noise_mlp(torch.cat([ang.cos(), ang.sin()], 1)) + self.label_emb(labels)
        emb = F.silu(emb)
        h = self.conv_in(x)
        hs = [h]
        for m in self.down:
            h = m(h, emb) if isinstance(m, _ResBlock) else m(h)
            hs.append(h)
        h = self.mid2(self.attn(self.mid1(h, emb)), emb)
        for m in self.up:
            h = m(torch.cat([h, hs.pop()], 1), emb) if isinstance(m, _ResBlock) else m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class EDMPrecond(nn.Module):
    """EDM preconditioning ``D(x, sigma, y) = c_skip x + c_out F(c_in x, ln(sigma) / 4, y)``.

    Args:
        net (:class:`DigitsUNet`): the raw network ``F``.
        sigma_data (`float`): data standard deviation assumed by the preconditioning.
    """

    def __init__(self, net: DigitsUNet, sigma_data: float = SIGMA_DATA):
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0]).reshape(-1, 1, 1, 1)
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1 / (sigma ** 2 + sd2).sqrt()
        c_noise = sigma.log().flatten() / 4
        return c_skip * x + c_out * self.net(c_in * x, c_noise, labels)


def build_net(arch: dict) -> EDMPrecond:
    """Build the preconditioned network from an architecture dict (keys of :data:`DEFAULT_ARCH`)."""
    unknown = set(arch) - set(DEFAULT_ARCH)
    if unknown:
        raise ConfigError(f"arch: unknown key(s) {sorted(unknown)}; known: {sorted(DEFAULT_ARCH)}")
    return EDMPrecond(DigitsUNet(**{**DEFAULT_ARCH, **arch}))


# --------------------------------------------------------------------------------------------------------------
# Denoiser adapter and backbone.

class DigitsDenoiser:
    """``D(x, sigma, labels) -> x0_hat`` with classifier-free guidance inside.

    ``D = D_uncond + w (D_cond - D_uncond)``; ``w = 1`` is the conditional model alone (one pass), ``w = 0`` the
    unconditional one. Otherwise both branches run in one doubled batch (``passes_per_eval = 2``).

    Args:
        net (:class:`EDMPrecond`): the trained network (used in eval mode, parameters frozen).
        guidance (`float`): CFG scale ``w``.
    """

    coords = "edm"
    sigma_min = 0.002
    sigma_max = 80.0

    def __init__(self, net: EDMPrecond, guidance: float = 1.0):
        self.net = net.eval().requires_grad_(False)
        self.guidance = float(guidance)
        if not math.isfinite(self.guidance):
            raise ConfigError(f"guidance: expected a finite number, got {guidance!r}")

    @property
    def passes_per_eval(self) -> int:
        return 1 if self.guidance in (0.0, 1.0) else 2

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        m = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        sigma = sigma.expand(m) if sigma.dim() == 0 else sigma.reshape(m)
        xf = x.float()
        null = torch.full((m,), NULL_CLASS, dtype=torch.long, device=x.device)
        if cond is None or self.guidance == 0.0:
            out = self.net(xf, sigma, null)
        else:
            labels = check_labels(cond.tensors["labels"] if hasattr(cond, "tensors") else cond, "cond")
            if m % labels.shape[0]:
                raise EPDError(f"cond: {labels.shape[0]} labels do not divide a batch of {m} states")
            labels = labels.to(x.device).repeat(m // labels.shape[0])
            if self.guidance == 1.0:
                out = self.net(xf, sigma, labels)
            else:
                both = self.net(torch.cat([xf, xf]), torch.cat([sigma, sigma]), torch.cat([labels, null]))
                d_cond, d_uncond = both.chunk(2)
                out = d_uncond + self.guidance * (d_cond - d_uncond)
        return out.to(x.dtype)


def edm_sigmas(num_points: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) polynomial grid of ``num_points`` noise levels from ``sigma_max`` down to ``sigma_min``
    (float64, no final 0)."""
    if num_points < 2:
        raise ConfigError(f"num_points: a grid needs at least 2 points, got {num_points}")
    i = torch.arange(num_points, dtype=torch.float64) / (num_points - 1)
    return (sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


class DigitsBackbone:
    """The embedded digits backbone (:class:`~epd.backbones.base.Backbone` protocol).

    Args:
        net (:class:`EDMPrecond`): the trained network.
        meta (`dict`): the ``model.json`` content (architecture, data split, training config).
        guidance (`float`): classifier-free guidance scale.
    """

    name = "digits"
    coords = "edm"
    sigma_min = 0.002
    sigma_max = 80.0
    default_schedule = "edm"
    graph_safe = False  # each call validates its labels on the host: `epd sample` leaves CUDA graphs off (auto)

    def __init__(self, net: EDMPrecond, meta: dict | None = None, guidance: float = 1.0):
        self.meta = meta or {}
        self.denoiser = DigitsDenoiser(net, guidance)
        self.resolution = net.net.resolution
        self.device = next(net.parameters()).device

    @classmethod
    def load(cls, weights_dir: str | Path, guidance: float = 1.0, device: str = "cpu") -> "DigitsBackbone":
        """Load ``model.safetensors`` + ``model.json`` from a training output folder."""
        net, meta = load_model(weights_dir, device=device)
        return cls(net, meta, guidance)

    @property
    def guidance(self) -> float:
        return self.denoiser.guidance

    def prepare(self, prompts: list[str]) -> torch.Tensor:
        """Labels ``(B,)`` for text prompts (unknown prompts raise :class:`EPDError` listing accepted forms)."""
        return parse_prompts(prompts).to(self.device)

    def noise(self, seeds: list[int], sigma: float | None = None) -> torch.Tensor:
        """``randn(1, H, W) * sigma`` (default ``sigma_max``) from ``torch.Generator().manual_seed(seed)`` per seed
        (CPU)."""
        shape = (1, self.resolution, self.resolution)
        z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        return z.to(self.device) * (self.sigma_max if sigma is None else float(sigma))

    def sigmas(self, num_points: int, schedule: str | None = None, rho: float | None = None, **kw) -> torch.Tensor:
        """The EDM polynomial grid (``schedule="edm"``, ``rho=7``) from ``sigma_max`` to ``sigma_min``; other names
        (``logsnr``, ``time_uniform``) come from :func:`epd.schedules.get_schedule`."""
        schedule = schedule or self.default_schedule
        s_min = float(kw.pop("sigma_min", self.sigma_min))
        s_max = float(kw.pop("sigma_max", self.sigma_max))
        if kw:
            raise ConfigError(f"sigmas: unknown option(s) {sorted(kw)}")
        if schedule in ("edm", "polynomial"):
            return edm_sigmas(num_points, s_min, s_max, 7.0 if rho is None else float(rho))
        try:
            from ...schedules import get_schedule
        except ImportError:
            raise ConfigError(f"schedule: {schedule!r} is not available for the digits backbone; use 'edm'") from None
        return get_schedule(schedule, num_points, sigma_min=s_min, sigma_max=s_max, rho=rho)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in ``[0, 1]`` (grey replicated), clamped."""
        return ((x.float() + 1) / 2).clamp(0, 1).expand(-1, 3, -1, -1).contiguous()


# --------------------------------------------------------------------------------------------------------------
# Save / load with checks.

def save_model(out_dir: str | Path, net: nn.Module, meta: dict, stem: str = "model") -> tuple[Path, Path]:
    """Write ``{stem}.safetensors`` and ``{stem}.json`` atomically; the JSON records the tensors' sha256.

    Args:
        out_dir: folder to write into.
        net: module whose ``state_dict`` is saved.
        meta (`dict`): JSON-serialisable metadata; must hold ``arch``.

    Returns:
        The two paths written.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    st_path, js_path = out_dir / f"{stem}.safetensors", out_dir / f"{stem}.json"
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(st_path, ".safetensors") as tmp:
        save_file(state, str(tmp))
        sha = sha256_file(tmp)
    meta = {**meta, "sha256": sha, "config_hash": config_hash({k: v for k, v in meta.items() if k != "sha256"})}
    atomic_write_json(js_path, meta)
    return st_path, js_path


def read_meta(path: str | Path, expected_format: str) -> dict:
    """Read a ``*.json`` written by :func:`save_model` and check its format tag."""
    path = Path(path)
    if not path.is_file():
        raise EPDError(f"{path}: not found; train the backbone first (`epd backbone train --out {path.parent}`)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EPDError(f"{path}: not valid JSON ({e}); the file is corrupt — retrain or restore it") from None
    if not isinstance(meta, dict) or meta.get("format") != expected_format:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise EPDError(f"{path}: format {got!r}, expected {expected_format!r}")
    if "arch" not in meta:
        raise EPDError(f"{path}: missing the 'arch' entry needed to rebuild the network")
    return meta


def load_safetensors_checked(path: str | Path, module: nn.Module, meta: dict | None = None,
                             meta_path: str | Path | None = None) -> None:
    """Load a safetensors file into ``module``, with errors naming the file and what is wrong.

    Checks, in order: the file exists and parses (a truncated file fails here), no missing or unexpected keys,
    every shape matches the architecture, and (when ``meta`` has ``sha256``) the content matches the JSON.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise EPDError(f"{path}: not found")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise EPDError(f"{path}: cannot read safetensors ({e}); the file is truncated or corrupt — "
                       "retrain or restore it") from None
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise EPDError(f"{path}: does not match the architecture in {meta_path or 'its JSON'}: "
                       f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                       f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    wrong = [f"{k}: file {tuple(state[k].shape)} vs architecture {tuple(v.shape)}"
             for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        raise EPDError(f"{path}: tensor shapes do not match the architecture in {meta_path or 'its JSON'}: "
                       + "; ".join(wrong[:5]) + (" ..." if len(wrong) > 5 else ""))
    if meta and meta.get("sha256") and sha256_file(path) != meta["sha256"]:
        raise EPDError(f"{path}: content does not match {meta_path or 'its JSON'} (sha256 differs); the two files "
                       "come from different runs — restore the pair or retrain")
    module.load_state_dict(state)


def load_model(weights_dir: str | Path, device: str = "cpu") -> tuple[EDMPrecond, dict]:
    """Load the trained denoiser from ``weights_dir/model.safetensors`` + ``model.json``.

    Returns:
        ``(net, meta)`` with ``net`` in eval mode on ``device``.
    """
    weights_dir = Path(weights_dir)
    js, st = weights_dir / "model.json", weights_dir / "model.safetensors"
    meta = read_meta(js, FORMAT)
    try:
        net = build_net(meta["arch"])
    except (ConfigError, TypeError) as e:
        raise EPDError(f"{js}: invalid 'arch' ({e})") from None
    load_safetensors_checked(st, net, meta, js)
    return net.to(device).eval(), meta
