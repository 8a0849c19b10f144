"""Native EPD table files: ``<stem>.safetensors`` (tensors) + ``<stem>.json`` (metadata, config hash, provenance).

:func:`load` also reads the original system's ``.pkl`` snapshots, through :mod:`epd.legacy` (allow-list
unpickler). The table itself is :class:`epd.table.EPDTable`. A folder stands for the one snapshot in it (any
``*.safetensors`` or ``*.pkl`` name); with several, the error lists them and asks for one.
:func:`describe` reads a snapshot's metadata and values without importing torch (``epd predictor show``).
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ConfigError, EPDError
from .io import atomic_path, atomic_write_json, config_hash, sha256_file

__all__ = ["load", "save", "describe", "resolve_snapshot", "FORMAT_VERSION"]

FORMAT_VERSION = 1


# ---------------------------------------------------------------------- native I/O
def _stem(path: Path) -> Path:
    return path.with_suffix("") if path.suffix in (".safetensors", ".json") else path


def save(table, path: str | Path) -> Path:
    """Write ``<stem>.safetensors`` and ``<stem>.json`` atomically; returns the ``.safetensors`` path."""
    from safetensors.torch import save_file

    stem = _stem(Path(path))
    st = stem.with_suffix(".safetensors")
    with atomic_path(st, suffix=".safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in table.tensors().items()}, str(tmp))
        digest = sha256_file(tmp)
    meta = {"format": "epd-table", "format_version": FORMAT_VERSION, "meta": table.meta,
            "provenance": table.provenance}
    meta["config_hash"] = config_hash(table.meta)
    meta["tensors_sha256"] = digest  # pairs the two files: a save interrupted between them is detected on load
    atomic_write_json(stem.with_suffix(".json"), meta)
    return st


def _read_native(path: Path, load_file) -> tuple[dict, dict]:
    """The checked ``(json document, tensors)`` of a native snapshot; ``load_file`` is safetensors' torch or numpy
    reader."""
    from safetensors import SafetensorError

    stem = _stem(path)
    st, js = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    for f in (st, js):
        if not f.is_file():
            raise EPDError(f"snapshot {f}: missing (a native snapshot is a .safetensors + .json pair)")
    try:
        tensors = load_file(str(st))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise EPDError(f"snapshot {st}: unreadable safetensors file ({e})") from None
    try:
        doc = json.loads(js.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EPDError(f"snapshot {js}: metadata is not valid JSON ({e})") from None
    fmt = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
    if fmt != "epd-table":
        raise EPDError(f"snapshot {js}: not an epd table (format={fmt!r})")
    if doc.get("tensors_sha256") and sha256_file(st) != doc["tensors_sha256"]:
        raise EPDError(f"snapshot {st}: does not belong to {js.name} (sha256 differs): the two files come from "
                       "different saves, e.g. a job killed between writing them; rerun that job or restore both files")
    version = doc.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise EPDError(f"snapshot {js}: format_version must be an integer, got {version!r}")
    for key in ("meta", "provenance"):
        if not isinstance(doc.get(key, {}), dict):
            raise EPDError(f"snapshot {js}: '{key}' must be a JSON object, got {type(doc[key]).__name__}")
    if version > FORMAT_VERSION:
        raise EPDError(f"snapshot {js}: format_version {doc['format_version']} is newer than this epd "
                       f"({FORMAT_VERSION}); upgrade epd")
    missing = {"positions", "weights"} - tensors.keys()
    if missing:
        raise EPDError(f"snapshot {st}: missing tensors {sorted(missing)}")
    return doc, tensors


def _load_native(path: Path):
    from safetensors.torch import load_file

    from .table import EPDTable

    doc, tensors = _read_native(path, load_file)
    try:
        return EPDTable(tensors["positions"], tensors["weights"], tensors.get("scale_dir"),
                        tensors.get("scale_time"), meta=doc.get("meta", {}), provenance=doc.get("provenance", {}))
    except ConfigError as e:
        raise EPDError(f"snapshot {_stem(path).with_suffix('.safetensors')}: {e}") from None


_SNAPSHOT_SUFFIXES = (".safetensors", ".pkl")


def resolve_snapshot(path: str | Path) -> Path:
    """``path`` itself, or for a folder the one snapshot in it (any ``*.safetensors`` or ``*.pkl`` name).

    Raises:
        EPDError: a folder without a snapshot; ConfigError: a folder with several (all listed, asking for one).
    """
    path = Path(path)
    if not path.is_dir():
        return path
    cands = sorted(p for p in path.iterdir() if p.suffix in _SNAPSHOT_SUFFIXES and not p.name.startswith("."))
    if not cands:
        raise EPDError(f"snapshot folder {path}: contains no .safetensors or .pkl file; pass the snapshot file")
    if len(cands) > 1:
        raise ConfigError(f"snapshot folder {path}: holds {len(cands)} snapshots, pass one of them:\n  "
                          + "\n  ".join(str(c) for c in cands))
    return cands[0]


def load(path: str | Path):
    """Load a snapshot (:class:`~epd.table.EPDTable`): native (``.safetensors``/``.json``), the original's ``.pkl``
    (allow-list unpickler), or a folder holding exactly one of them."""
    path = resolve_snapshot(path)
    if path.suffix == ".pkl":
        from .legacy import load_legacy_pickle

        return load_legacy_pickle(path)
    return _load_native(path)


def describe(path: str | Path) -> tuple[dict, dict, dict]:
    """``(meta, provenance, arrays)`` of a snapshot without importing torch (numpy arrays), for display.

    Args:
        path: as for :func:`load`.
    """
    path = resolve_snapshot(path)
    if path.suffix == ".pkl":
        from .legacy import describe_legacy

        return describe_legacy(path)
    from safetensors.numpy import load_file

    doc, arrays = _read_native(path, load_file)
    meta = {**doc.get("meta", {}), "num_steps": arrays["positions"].shape[0] + 1,
            "num_points": arrays["positions"].shape[-1]}
    return meta, doc.get("provenance", {}), arrays
