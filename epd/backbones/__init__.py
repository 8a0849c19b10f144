"""Backbone adapters implementing the Denoiser contract (:mod:`epd.backbones.base`).

:func:`backbone_class` gives the adapter class of a kind, whose capabilities (:mod:`epd.backbones.adapter`) can be
read without loading weights; :func:`load_backbone` builds a backbone from a config section through that class.
Heavy packages are imported only for the kind requested.
"""

from __future__ import annotations

import importlib

from ..errors import ConfigError

__all__ = ["KINDS", "backbone_class", "kinds_with", "load_backbone"]

# kind -> module whose ``BACKBONE`` is the adapter class.
KINDS = {
    "digits": "epd.backbones.digits",
    "gmm": "epd.backbones.gmm",
    "sd15": "epd.backbones.sd15",
    "sd3": "epd.backbones.sd3",
    "flux": "epd.backbones.flux",
}


def backbone_class(kind: str) -> type:
    """The adapter class of backbone ``kind`` (a :class:`~epd.backbones.adapter.BackboneAdapter`), importing only
    that adapter's module.

    Raises:
        ConfigError: ``kind`` is not one of :data:`KINDS`.
    """
    if kind not in KINDS:
        raise ConfigError(f"backbone kind: unknown {kind!r}; accepted: {sorted(KINDS)}")
    return importlib.import_module(KINDS[kind]).BACKBONE


def kinds_with(capability: str) -> list[str]:
    """The kinds whose class has ``capability`` (see :data:`epd.backbones.adapter.CAPABILITIES`), in :data:`KINDS`
    order."""
    return [k for k in KINDS if backbone_class(k).supports(capability)]


def load_backbone(section: dict, device: str = "cpu", **kw):
    """Build the backbone described by a config section (``{"kind": ..., ...}``).

    Args:
        section (`dict`): the config's ``backbones.<name>`` entry; ``kind`` is one of :data:`KINDS`.
        device (`str`): torch device.
        kw: forwarded to the class's ``from_section`` (e.g. ``weights_dir`` for a backbone loaded from a
            weights folder).
    """
    kind = section.get("kind", section.get("name"))
    return backbone_class(kind).from_section(section, device=device, **kw)
