"""Backbone adapters implementing the Denoiser contract (:mod:`epd.backbones.base`).

:func:`load_backbone` builds one from a config section (``kind`` picks the adapter); heavy packages are imported
only for the kind requested.
"""

from __future__ import annotations

import importlib

from ..errors import ConfigError

KINDS = {
    "digits": "epd.backbones.digits",
    "gmm": "epd.backbones.gmm",
    "sd15": "epd.backbones.sd15",
    "sd3": "epd.backbones.sd3",
    "flux": "epd.backbones.flux",
}


def load_backbone(section: dict, device: str = "cpu", **kw):
    """Build the backbone described by a config section (``{"kind": ..., ...}``).

    Args:
        section (`dict`): the config's ``backbones.<name>`` entry; ``kind`` is one of :data:`KINDS`.
        device (`str`): torch device.
        kw: forwarded to the adapter's ``load`` (e.g. ``weights_dir`` for the digits backbone).
    """
    kind = section.get("kind", section.get("name"))
    if kind not in KINDS:
        raise ConfigError(f"backbone kind: unknown {kind!r}; accepted: {sorted(KINDS)}")
    if kind == "gmm":
        from .gmm import GMMBackbone, make_gmm

        return GMMBackbone(make_gmm(**section.get("gmm", {})), guidance=float(section.get("guidance", 1.0)))
    if kind == "digits":
        from .digits import DigitsBackbone

        wdir = kw.get("weights_dir") or section.get("weights")
        if not wdir:
            raise ConfigError("backbone digits: no trained model folder given (--weights DIR, the output of "
                              "`epd backbone train`, or backbones.<name>.weights in the config)")
        return DigitsBackbone.load(wdir, guidance=float(section.get("guidance", 1.0)), device=device)
    return importlib.import_module(KINDS[kind]).load(section, device=device, **kw)
