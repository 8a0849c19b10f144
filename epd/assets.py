"""``epd assets fetch`` / ``epd assets verify``: the original system's released files, checksummed.

Studies need some files the original RLEPD system published (its start / distilled / best EPD tables, prompt
lists, FLUX result JSONs). :file:`original_assets.json` (shipped with the package) pins them: source repository,
commit, URL template and one ``{path, sha256, size}`` per file. :func:`fetch` brings them into a git-ignored
folder (default ``data/original``), keeping the upstream relative paths (``DEST/exps/best_models/sd15/...``,
``DEST/src/prompts/...``, ``DEST/results/...``), either from a *mirror* (a folder laid out like the upstream
repository, e.g. a checkout of it) or from the pinned raw-file URL. Every file is written to a temporary name
in its destination folder, checked (size and sha256), and only then renamed into place: a final name never
holds a partial or unverified file. Files already present with the right checksum are skipped.

Stdlib only (no torch): the command must run before any heavy dependency is usable.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable

from .errors import EPDError
from .io import atomic_path, read_json, sha256_file

__all__ = ["Asset", "Manifest", "MANIFEST_PATH", "DEFAULT_DEST", "TIMEOUT_S", "load_manifest", "fetch", "verify",
           "missing", "add_arguments", "run"]

MANIFEST_PATH = Path(__file__).with_name("original_assets.json")
DEFAULT_DEST = Path("data/original")
TIMEOUT_S = 30.0
_CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")

Report = Callable[[str], None]


@dataclass(frozen=True)
class Asset:
    """One released file: its upstream repo-relative POSIX ``path``, ``sha256`` (hex) and ``size`` in bytes."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """The pinned list of released files (see :file:`original_assets.json`)."""

    repo: str
    commit: str
    url_template: str
    note: str
    files: tuple[Asset, ...]

    def url(self, path: str) -> str:
        """The download URL of the repo-relative ``path`` at the pinned commit."""
        return self.url_template.format(repo=self.repo, commit=self.commit, path=urllib.parse.quote(path))

    def source_hint(self) -> str:
        """How to describe a valid mirror in an error message."""
        return f"a checkout of {self.repo} at commit {self.commit}, or a folder with the same relative paths"


# ---------------------------------------------------------------------- manifest
def load_manifest(path: Path = MANIFEST_PATH) -> Manifest:
    """Read and validate the asset manifest (by default the one shipped with the package).

    Raises :class:`EPDError` naming the manifest and the bad entry if a field is missing or malformed, or a
    path is absolute, climbs out of the destination (``..``) or appears twice.
    """
    doc = read_json(path)
    try:
        files = tuple(Asset(str(f["path"]), str(f["sha256"]), int(f["size"])) for f in doc["files"])
        manifest = Manifest(str(doc["repo"]), str(doc["commit"]), str(doc["url_template"]), str(doc.get("note", "")),
                            files)
    except (KeyError, TypeError, ValueError) as e:
        raise EPDError(f"asset manifest {path}: malformed ({type(e).__name__}: {e}); reinstall the package") from None
    seen: set[str] = set()
    for a in files:
        p = PurePosixPath(a.path)
        if p.is_absolute() or ".." in p.parts or not p.parts or str(p) != a.path or a.path in seen:
            raise EPDError(f"asset manifest {path}: bad or duplicate path {a.path!r}; reinstall the package")
        if not _SHA256.fullmatch(a.sha256) or a.size < 0:
            raise EPDError(f"asset manifest {path}: {a.path}: bad sha256 or size; reinstall the package")
        seen.add(a.path)
    return manifest


def _select(manifest: Manifest, only: list[str] | None) -> list[Asset]:
    """The manifest's files named by ``only`` (exact paths or folder prefixes); all files if ``only`` is None."""
    if only is None:
        return list(manifest.files)
    wanted = [str(PurePosixPath(o.strip().rstrip("/"))) for o in only]
    unknown = [o for o, w in zip(only, wanted) if not any(a.path == w or a.path.startswith(w + "/")
                                                          for a in manifest.files)]
    if unknown:
        folders = sorted({str(PurePosixPath(a.path).parent) for a in manifest.files})
        raise EPDError(f"--only {' '.join(unknown)}: not a file or folder of the asset manifest; "
                       f"use a path such as {manifest.files[0].path} or a folder among {', '.join(folders)}")
    return [a for a in manifest.files if any(a.path == w or a.path.startswith(w + "/") for w in wanted)]


# ---------------------------------------------------------------------- checks
def _problem(dest: Path, asset: Asset) -> str | None:
    """Why ``dest/asset.path`` is not a verified copy of ``asset``, or None if it is."""
    target = dest / asset.path
    if not target.is_file():
        return f"{asset.path}: missing"
    try:
        size = target.stat().st_size
        found = sha256_file(target) if size == asset.size else ""
    except OSError as e:
        return f"{asset.path}: unreadable ({e.strerror or e})"
    if size != asset.size:
        return f"{asset.path}: wrong size: expected {asset.size} bytes, found {size}"
    if found != asset.sha256:
        return f"{asset.path}: corrupt: expected sha256 {asset.sha256}, found {found}"
    return None


def verify(dest: Path = DEFAULT_DEST) -> list[str]:
    """Check every manifest file under ``dest``; return one line per problem (missing, wrong size, wrong
    sha256), or an empty list if all are present and verified."""
    dest = Path(dest)
    return [p for a in load_manifest().files if (p := _problem(dest, a)) is not None]


def missing(dest: Path, paths: list[str]) -> list[str]:
    """The manifest files among ``paths`` (repo-relative paths or folder prefixes, as for ``--only``) that are
    not present under ``dest`` with the right size and sha256. Raises :class:`EPDError` for a path that is not
    in the manifest."""
    dest = Path(dest)
    return [a.path for a in _select(load_manifest(), list(paths)) if _problem(dest, a) is not None]


# ---------------------------------------------------------------------- copying
def _stream_checked(read: Callable[[int], bytes], tmp: Path, asset: Asset) -> tuple[int, str, bool]:
    """Copy ``read``'s bytes into ``tmp``; return (bytes, sha256, overflow). Stops reading once the stream is
    longer than expected (``overflow``), so a wrong response cannot fill the disk."""
    h = hashlib.sha256()
    n = 0
    with open(tmp, "wb") as out:
        while n <= asset.size:
            block = read(_CHUNK)
            if not block:
                break
            h.update(block)
            out.write(block)
            n += len(block)
    return n, h.hexdigest(), n > asset.size


def _install(asset: Asset, target: Path, read: Callable[[int], bytes], source: str, fix: str) -> None:
    """Write ``read``'s bytes to ``target`` through a temporary; rename only if size and sha256 match."""
    with atomic_path(target) as tmp:
        n, found, overflow = _stream_checked(read, tmp, asset)
        if overflow or n != asset.size or found != asset.sha256:
            got = f"more than {asset.size} bytes (stopped reading)" if overflow else f"sha256 {found} ({n} bytes)"
            kept = "left unchanged" if target.exists() else "not created"
            raise EPDError(f"{asset.path}: checksum mismatch for {source}: expected sha256 {asset.sha256} "
                           f"({asset.size} bytes), found {got}; {target} was {kept}. {fix}")


def _from_mirror(manifest: Manifest, asset: Asset, mirror: Path, target: Path) -> None:
    src = mirror / asset.path
    fix = (f"The mirror's copy is corrupt or from another version: check {src} ({manifest.source_hint()}), "
           "or fetch without --mirror to download it")

    def unreadable(e: OSError) -> EPDError:
        return EPDError(f"mirror {mirror}: cannot read {src} ({e.strerror or e}); {target} was not written")

    def read(n: int) -> bytes:
        try:
            return f.read(n)
        except OSError as e:
            raise unreadable(e) from None

    try:
        f: BinaryIO = open(src, "rb")
    except OSError as e:
        raise unreadable(e) from None
    with f:
        _install(asset, target, read, str(src), fix)


def _unreachable(manifest: Manifest, url: str, e: BaseException) -> EPDError:
    if isinstance(e, urllib.error.HTTPError):
        why = f"HTTP {e.code} {e.reason}"
    elif isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError):
        why = f"timed out after {TIMEOUT_S:g} s"
    else:
        why = str(getattr(e, "reason", None) or e) or type(e).__name__
    return EPDError(f"cannot download {url}: {why}. Without network access to it, pass --mirror DIR "
                    f"({manifest.source_hint()}). Files fetched before this one are complete and verified; "
                    "nothing partial was left; rerun to resume")


def _from_url(manifest: Manifest, asset: Asset, target: Path) -> None:
    url = manifest.url(asset.path)

    def read(n: int) -> bytes:
        try:
            return resp.read(n)
        except (OSError, http.client.HTTPException) as e:
            raise _unreachable(manifest, url, e) from None

    fix = (f"The download was corrupted or the file changed upstream: re-fetch with `epd assets fetch`, or pass "
           f"--mirror DIR ({manifest.source_hint()})")
    try:
        resp = urllib.request.urlopen(url, timeout=TIMEOUT_S)
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise _unreachable(manifest, url, e) from None
    with resp:
        _install(asset, target, read, url, fix)


# ---------------------------------------------------------------------- fetch
def _check_mirror(manifest: Manifest, mirror: Path, todo: list[Asset]) -> None:
    """Fail before writing anything if the mirror is not a folder or lacks a requested file."""
    if not mirror.is_dir():
        raise EPDError(f"--mirror {mirror}: not a directory; pass {manifest.source_hint()}")
    absent = [str(mirror / a.path) for a in todo if not (mirror / a.path).is_file()]
    if absent:
        shown = ", ".join(absent[:5]) + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
        raise EPDError(f"mirror {mirror}: missing {len(absent)} of the {len(todo)} requested files: {shown}. "
                       f"A mirror must be {manifest.source_hint()}; nothing was written")


def fetch(dest: Path = DEFAULT_DEST, mirror: Path | None = None, only: list[str] | None = None, *,
          report: Report | None = None) -> list[Path]:
    """Bring the manifest's files (or those named by ``only``) into ``dest``, verified; return their paths.

    ``mirror``: a folder laid out like the upstream repository; without it each file is downloaded from the
    manifest's URL (timeout :data:`TIMEOUT_S`). Files already present with the right sha256 are skipped, so the
    call is idempotent. A mirror lacking a requested file fails before anything is written; a checksum
    mismatch or an unreachable source raises :class:`EPDError` leaving nothing under that file's final name
    (files verified before it stay). ``report`` receives one line per file.
    """
    dest = Path(dest)
    manifest = load_manifest()
    assets = _select(manifest, only)
    problems = {a.path: _problem(dest, a) for a in assets}
    todo = [a for a in assets if problems[a.path] is not None]
    if mirror is not None:
        _check_mirror(manifest, Path(mirror), todo)
    say = report or (lambda line: None)
    for a in assets:
        target = dest / a.path
        if problems[a.path] is None:
            say(f"ok (already present)  {a.path}")
            continue
        try:
            if mirror is not None:
                _from_mirror(manifest, a, Path(mirror), target)
            else:
                _from_url(manifest, a, target)
        except OSError as e:  # reading errors are EPDErrors already: this is the destination
            raise EPDError(f"cannot write {target} ({e.strerror or e}); check --out {dest}") from None
        replaced = "" if problems[a.path].endswith(": missing") else ", replaced a corrupt copy"
        say(f"ok (fetched{replaced})  {a.path}")
    return [dest / a.path for a in assets]


# ---------------------------------------------------------------------- CLI
def _words(args_or_parser) -> tuple:
    if hasattr(args_or_parser, "get_default"):
        return tuple(args_or_parser.get_default("_words") or ())
    return tuple(getattr(args_or_parser, "_words", ()) or ())


def add_arguments(p) -> None:
    """Arguments of ``epd assets fetch`` and ``epd assets verify``."""
    p.add_argument("--out", type=Path, default=DEFAULT_DEST, metavar="DIR",
                   help=f"destination root; upstream relative paths are kept under it (default: {DEFAULT_DEST})")
    if _words(p)[-1:] == ("fetch",):
        p.add_argument("--mirror", type=Path, default=None, metavar="DIR",
                       help="copy from a folder laid out like the upstream repository instead of downloading")
        p.add_argument("--only", nargs="+", action="extend", default=None, metavar="PATH",
                       help="fetch only these repo-relative files or folders (e.g. exps/best_models/sd15)")


def run(args) -> int:
    """Run ``epd assets fetch`` or ``epd assets verify``; one line per file, then a summary."""
    manifest = load_manifest()
    where = f"{manifest.repo}@{manifest.commit[:12]}"
    if _words(args)[-1:] == ("fetch",):
        fetched: list[str] = []

        def report(line: str) -> None:
            print(line)
            if line.startswith("ok (fetched"):
                fetched.append(line)

        paths = fetch(args.out, mirror=args.mirror, only=args.only, report=report)
        print(f"{len(paths)} files of {where} under {args.out}: {len(fetched)} fetched, "
              f"{len(paths) - len(fetched)} already present; all verified (size and sha256)")
        return 0
    status = {a.path: _problem(Path(args.out), a) for a in manifest.files}
    problems = [p for p in status.values() if p is not None]
    for path, problem in status.items():
        print(problem or f"ok  {path}")
    if problems:
        raise EPDError(f"{len(problems)} of {len(manifest.files)} files of {where} missing or corrupt under "
                       f"{args.out}; run `epd assets fetch --out {args.out}` (add --mirror DIR without network)")
    print(f"{len(manifest.files)} files of {where} under {args.out}: all verified (size and sha256)")
    return 0
