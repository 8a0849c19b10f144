"""Native EPD table files: ``<stem>.safetensors`` (tensors) + ``<stem>.json`` (metadata, config hash, provenance).

:func:`load` also reads the original system's ``.pkl`` snapshots, through :mod:`epd.legacy` (allow-list
unpickler). The table itself is :class:`epd.table.EPDTable`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ConfigError, EPDError
from .io import atomic_path, atomic_write_json, config_hash, sha256_file
from .legacy import load_legacy_pickle
from .table import EPDTable

__all__ = ["load", "save", "FORMAT_VERSION"]

FORMAT_VERSION = 1


# ---------------------------------------------------------------------- native I/O
def _stem(path: Path) -> Path:
    return path.with_suffix("") if path.suffix in (".safetensors", ".json") else path


def save(table: EPDTable, path: str | Path) -> Path:
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


def _load_native(path: Path) -> EPDTable:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

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
    try:
        return EPDTable(tensors["positions"], tensors["weights"], tensors.get("scale_dir"),
                        tensors.get("scale_time"), meta=doc.get("meta", {}), provenance=doc.get("provenance", {}))
    except ConfigError as e:
        raise EPDError(f"snapshot {st}: {e}") from None


def load(path: str | Path) -> EPDTable:
    """Load a snapshot: native (``.safetensors``/``.json``) or the original's ``.pkl`` (allow-list unpickler)."""
    path = Path(path)
    if path.suffix == ".pkl":
        return load_legacy_pickle(path)
    if path.is_dir():
        cands = sorted(path.glob("*.safetensors")) or sorted(path.glob("network-snapshot-*.pkl"))
        if not cands:
            raise EPDError(f"snapshot directory {path}: contains no .safetensors or network-snapshot-*.pkl")
        return load(cands[-1])
    return _load_native(path)
