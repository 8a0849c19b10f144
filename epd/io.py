"""Small I/O helpers: atomic writes, seed ranges, prompt files, JSON/YAML."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import ConfigError, EPDError

__all__ = [
    "atomic_path", "atomic_write_text", "atomic_write_json", "parse_seeds", "read_prompts",
    "read_json", "config_hash", "sha256_file",
]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    A reader never sees a half-written file under the final name: either the old file or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    import numpy as np
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | os.PathLike):
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise EPDError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise EPDError(f"{path}: not valid JSON ({e})") from None


def parse_seeds(spec: str | int | list) -> list[int]:
    """Parse a seed specification such as ``"0-63"``, ``"1,5,9-11"`` or ``7`` into a list of ints.

    Ranges are inclusive, as in the original ``sample.py``. ``"5-2"`` is an error, not an empty list.
    """
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, (list, tuple)):
        return [int(s) for s in spec]
    out: list[int] = []
    text = str(spec).strip()
    if not text:
        raise ConfigError("seeds: empty specification; use e.g. '0-63' or '1,5,9-11'")
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (None, None)
                lo, hi = int(lo), int(hi)
            else:
                lo = hi = int(part)
        except (TypeError, ValueError):
            raise ConfigError(f"seeds: cannot parse '{part}' in '{spec}'; use e.g. '0-63' or '1,5,9-11'") from None
        if hi < lo:
            raise ConfigError(f"seeds: range '{part}' is descending; write it as '{hi}-{lo}'")
        out.extend(range(lo, hi + 1))
    if any(s < 0 or s >= 2**32 for s in out):
        raise ConfigError(f"seeds: values must lie in [0, 2^32); got '{spec}'")
    return out


_PROMPT_COLUMNS = ("text", "prompt", "caption")


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Read prompts from a ``.txt`` file (one per line) or a ``.csv`` with a ``text``/``prompt``/``caption`` column.

    Handles a UTF-8 BOM, CRLF line endings and a missing final newline. Raises :class:`EPDError` naming the
    file for an empty file, binary content, or a CSV without a usable column.
    """
    path = Path(path)
    if not path.is_file():
        raise EPDError(f"prompt file {path}: not found")
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise EPDError(f"prompt file {path}: binary content (NUL bytes); expected UTF-8 text")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise EPDError(f"prompt file {path}: not UTF-8 text ({e})") from None
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        fields = [f for f in (rows[0].keys() if rows else csv.DictReader(text.splitlines()).fieldnames or [])]
        col = next((c for c in _PROMPT_COLUMNS if c in fields), None)
        if col is None:
            raise EPDError(f"prompt file {path}: CSV has columns {fields}; expected one of {list(_PROMPT_COLUMNS)}")
        prompts = [r[col].strip() for r in rows]
    else:
        prompts = [line.strip() for line in text.splitlines()]
        prompts = [p for p in prompts if p]
    if not prompts or not any(prompts):
        raise EPDError(f"prompt file {path}: contains no prompts")
    return prompts


def config_hash(obj) -> str:
    """Stable short hash of a JSON-serialisable config (sorted keys)."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
