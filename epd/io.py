"""Small I/O helpers: atomic writes, seed ranges, prompt files, JSON/YAML."""

from __future__ import annotations

import contextlib
import csv
import errno
import glob
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import ConfigError, EPDError

__all__ = [
    "atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "parse_seeds", "read_prompts",
    "read_json", "config_hash", "sha256_file",
]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    A reader never sees a half-written file under the final name: either the old file or the new one. The new
    file gets the old file's permissions (or the umask's defaults), not ``mkstemp``'s private 0600. A full disk
    (``ENOSPC``/``EDQUOT``, however the writer reports it) becomes an :class:`EPDError` naming the file and
    saying that the previous version is intact.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}.{os.getpid()}.", suffix=suffix or ".tmp",
                                    dir=path.parent)
        tmp = Path(name)
        os.fchmod(fd, _new_file_mode(path))
        os.close(fd)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        if isinstance(e, EPDError) or not _is_disk_full(e):
            raise
        state = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        raise EPDError(f"{path}: disk full while writing ({_disk_full_reason(e)}); nothing was replaced, {state}. "
                       f"Free space on {path.parent} and rerun: finished outputs are kept and the job resumes") from e
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


_HOST = "".join(c if c.isalnum() or c in "-_" else "_" for c in os.uname().nodename) or "host"


def _remove_stale_temps(path: Path) -> None:
    """Delete temporary files of ``path`` left by killed writers on this host (their process is gone), so jobs
    that are killed and resumed again and again do not fill the disk with dead temporaries. Temporaries of live
    processes and of other hosts (shared file systems) are left alone."""
    prefix = f".{path.name}.{_HOST}."
    for p in path.parent.glob(glob.escape(prefix) + "*"):
        pid = p.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                p.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")


def _is_disk_full(e: BaseException) -> bool:
    """True for ENOSPC/EDQUOT raised as ``OSError`` or wrapped in a library's own error text (safetensors)."""
    for _ in range(8):  # the exception and what it was raised from
        if e is None:
            break
        if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
            return True
        if any(t in str(e) for t in _DISK_FULL_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


def _disk_full_reason(e: BaseException) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else "No space left on device"


def _new_file_mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would briefly change it for every thread)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
        return umask


def load_error_text(e: BaseException) -> str:
    """A short reason for a failed ``torch.load(..., weights_only=True)``, without torch's advice to retry with
    ``weights_only=False`` (which would run whatever code the file carries)."""
    import re

    text = str(e)
    if "Weights only load failed" in text:
        m = re.search(r"GLOBAL ([\w.]+)", text)
        what = f"the global {m.group(1)}" if m else "objects other than tensors and plain containers"
        return f"refused to unpickle: the file references {what}, which a checkpoint of tensors never needs; " \
               "nothing in the file was executed"
    return f"{type(e).__name__}: {(text.splitlines() or [''])[0][:200]}"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (serialise in memory first, so a write error is a plain ``OSError``)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


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
        if lo < 0 or hi >= 2**32:  # checked before expanding: '0-99999999999' must not allocate a huge list
            raise ConfigError(f"seeds: values must lie in [0, 2^32); got '{spec}'")
        if len(out) + hi - lo + 1 > MAX_SEEDS:
            raise ConfigError(f"seeds: '{spec}' asks for more than {MAX_SEEDS:,} seeds; split the run")
        out.extend(range(lo, hi + 1))
    seen: set[int] = set()
    dup = next((s for s in out if s in seen or seen.add(s)), None)
    if dup is not None:
        raise ConfigError(f"seeds: {dup} appears more than once in '{spec}' (one image or trajectory per seed)")
    return out


MAX_SEEDS = 10_000_000


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
