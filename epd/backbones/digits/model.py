"""The network of the digits backbone and its checkpoint files.

* :class:`DigitsUNet` — a small conv U-Net conditioned on the noise level and the class (adaptive GroupNorm),
  with an extra null class for classifier-free guidance (label dropout during training).
* :class:`EDMPrecond` — Karras et al. (2022) preconditioning (``sigma_data = 0.5``, ``c_noise = ln(sigma) / 4``).
* :func:`save_model` / :func:`load_model` — ``model.safetensors`` + ``model.json`` with checks that name the file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import ConfigError, EPDError
from ...io import atomic_path, atomic_write_json, config_hash, sha256_file
from .data import NUM_CLASSES

__all__ = ["SIGMA_DATA", "DEFAULT_ARCH", "FORMAT", "FORMAT_VERSION", "DigitsUNet", "EDMPrecond", "build_net",
           "save_model", "load_model", "read_meta", "load_safetensors_checked"]

SIGMA_DATA = 0.5
FORMAT = "epd-digits-denoiser"
FORMAT_VERSION = 1

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
