"""``epd predictor show FILE`` and ``epd predictor convert OLD.pkl DEST``.

``show`` prints a table's summary and its full provenance (native snapshot, the original's ``.pkl`` read
through the allow-list unpickler of :mod:`epd.legacy`, or a folder holding one of them); it imports no torch.
``convert`` writes a legacy ``.pkl`` as a native snapshot: DEST is a folder (the snapshot keeps the pickle's name;
created when missing) or a file stem (``DIR/name`` -> ``DIR/name.safetensors`` + ``DIR/name.json``).
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError, EPDError


def _words(args_or_parser) -> tuple:
    if hasattr(args_or_parser, "get_default"):
        return tuple(args_or_parser.get_default("_words") or ())
    return tuple(getattr(args_or_parser, "_words", ()) or ())


def add_arguments(p) -> None:
    if _words(p)[-1:] == ("convert",):
        p.add_argument("source", help="the original's predictor snapshot (.pkl, any name), or a folder holding one")
        p.add_argument("dest", help="output folder (created if missing; the snapshot keeps the pickle's name), or "
                                    "an output stem DIR/NAME (writes NAME.safetensors and NAME.json)")
        p.add_argument("--force", action="store_true", help="overwrite an existing native snapshot at DEST")
    else:
        p.add_argument("file", help="snapshot: .pkl (original) or .safetensors/.json (native), or a folder holding "
                                    "exactly one .pkl/.safetensors file")


def convert_destination(source: Path, dest: str | Path) -> Path:
    """The native snapshot stem for ``convert``: ``dest/<pickle stem>`` when ``dest`` is a folder, ends with a
    separator or has no suffix (a folder to create), else ``dest`` without a ``.safetensors``/``.json`` suffix."""
    d = Path(dest)
    if d.suffix in (".safetensors", ".json"):
        return d.with_suffix("")
    if d.is_dir() or str(dest).endswith(("/", "\\")) or not d.suffix:
        return d / source.stem
    return d


def _convert(args) -> int:
    from .predictor import load, resolve_snapshot, save

    source = resolve_snapshot(args.source)
    if source.suffix != ".pkl":
        raise ConfigError(f"source: {source} is not a .pkl file (native snapshots need no conversion)")
    stem = convert_destination(source, args.dest)
    existing = [p for p in (stem.with_suffix(".safetensors"), stem.with_suffix(".json")) if p.exists()]
    if existing and not args.force:
        raise ConfigError(f"dest: {existing[0]} exists; pass --force to overwrite it or choose another DEST")
    table = load(source)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = save(table, stem)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def run(args) -> int:
    if _words(args)[-1:] == ("convert",):
        return _convert(args)
    from .predictor import describe
    from .table_text import summary_text

    if not Path(args.file).exists():
        raise EPDError(f"file: {args.file} not found")
    print(summary_text(*describe(args.file)))
    return 0
