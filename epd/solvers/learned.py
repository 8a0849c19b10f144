"""The learned-solver peers' labels, and learned time grids on disk (LD3, GITS).

A peer row is labelled ``amed`` / ``amed_plugin`` (an AMED table, sampled by that solver), ``ld3_<base>`` or
``gits_<base>`` (a learned grid for the base solver ``<base>``, e.g. ``ld3_dpmpp_2m``, ``gits_ipndm``).

A grid file is one JSON file that ``epd sample --sigmas FILE`` loads:

``{"format": "epd-grid", "method": "ld3" | "gits", "solver": <base solver>, "nfe": <paper NFE>, "num_points": N,
"sigmas": [N noise levels, decreasing], "backbone": <kind>, "provenance": {...}}``; the base solver is one of
:data:`epd.solvers.SOLVERS` and spends ``nfe`` sequential evaluations on the grid.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError, EPDError
from ..io import atomic_write_json, read_json
from .common import check_sigmas

__all__ = ["GRID_FORMAT", "GRID_METHODS", "AMED_SOLVERS", "parse_peer", "save_grid", "load_grid"]

GRID_FORMAT = "epd-grid"
GRID_METHODS = ("ld3", "gits")  # peers that learn a time grid for a base solver
AMED_SOLVERS = ("amed", "amed_plugin")  # peers that learn a K = 1 table
GRID_BASES = ("dpmpp_2m", "ipndm", "unipc", "euler", "ipndm_v", "dpmpp_3m")  # one evaluation per step


def parse_peer(label: str) -> tuple[str, str]:
    """``(method, solver)`` of a peer label: ``amed`` -> ``("amed", "amed")``, ``ld3_dpmpp_2m`` ->
    ``("ld3", "dpmpp_2m")``. Raises ConfigError naming the accepted forms."""
    if label in AMED_SOLVERS:
        return "amed", label
    method, _, base = label.partition("_")
    if method in GRID_METHODS and base in GRID_BASES:
        return method, base
    raise ConfigError(f"peers.solvers: unknown peer {label!r}; accepted: {', '.join(AMED_SOLVERS)}, or "
                      f"<{'|'.join(GRID_METHODS)}>_<base> with base in {', '.join(GRID_BASES)}")


def save_grid(path: str | Path, sigmas: torch.Tensor, *, method: str, solver: str, nfe: int, backbone: str | None,
              provenance: dict | None = None) -> dict:
    """Write a grid file atomically; returns the record written."""
    sig = check_sigmas(torch.as_tensor(sigmas).detach().double())
    rec = {"format": GRID_FORMAT, "method": method, "solver": solver, "nfe": int(nfe), "num_points": len(sig),
           "sigmas": sig.tolist(), "backbone": backbone, "provenance": provenance or {}}
    atomic_write_json(path, rec)
    return rec


def load_grid(path: str | Path, backbone: str | None = None) -> dict:
    """Read a grid file; ``sigmas`` comes back as a float64 tensor. ``backbone``: refuse a grid made for another."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--sigmas {path}: file not found (write one with `epd peer ld3` or `epd peer gits`)")
    rec = read_json(path)
    if not isinstance(rec, dict) or rec.get("format") != GRID_FORMAT:
        raise EPDError(f"--sigmas {path}: not a learned grid file (format {rec.get('format') if isinstance(rec, dict) else None!r}, "
                       f"expected {GRID_FORMAT!r})")
    if backbone is not None and rec.get("backbone") not in (None, backbone):
        raise ConfigError(f"--sigmas {path}: the grid was learned on backbone {rec['backbone']!r}, not {backbone!r}")
    rec["sigmas"] = check_sigmas(torch.tensor(rec["sigmas"], dtype=torch.float64), name=f"{path}: sigmas")
    return rec
