"""``epd predictor show FILE`` and ``epd predictor convert OLD.pkl DEST``.

``show`` prints a table's summary (native snapshot or the original's ``.pkl``, read through the allow-list
unpickler of :mod:`epd.legacy`). ``convert`` writes a legacy ``.pkl`` as a native snapshot: DEST is a directory
(the snapshot keeps the pickle's name) or a stem (``DIR/name`` -> ``DIR/name.safetensors`` + ``DIR/name.json``).
"""

from __future__ import annotations

from pathlib import Path

from .errors import EPDError
from .predictor import load, save


def _words(args_or_parser) -> tuple:
    if hasattr(args_or_parser, "get_default"):
        return tuple(args_or_parser.get_default("_words") or ())
    return tuple(getattr(args_or_parser, "_words", ()) or ())


def add_arguments(p) -> None:
    if _words(p)[-1:] == ("convert",):
        p.add_argument("source", help="the original's predictor snapshot (network-snapshot-*.pkl)")
        p.add_argument("dest", help="output directory, or output stem (writes STEM.safetensors and STEM.json)")
    else:
        p.add_argument("file", help="snapshot: .pkl (original) or .safetensors/.json (native), or a directory")


def convert_destination(source: Path, dest: str | Path) -> Path:
    """The native snapshot stem for ``convert``: ``dest/<pickle stem>`` if ``dest`` is (or ends like) a directory,
    else ``dest`` without a ``.safetensors``/``.json`` suffix."""
    d = Path(dest)
    if d.is_dir() or str(dest).endswith(("/", "\\")):
        return d / source.stem
    return d.with_suffix("") if d.suffix in (".safetensors", ".json") else d


def run(args) -> int:
    if _words(args)[-1:] == ("convert",):
        source = Path(args.source)
        if source.suffix != ".pkl":
            raise EPDError(f"predictor convert: {source} is not a .pkl file (native snapshots need no conversion)")
        table = load(source)
        out = save(table, convert_destination(source, args.dest))
        print(f"wrote {out} and {out.with_suffix('.json')}")
        return 0
    print(load(args.file).summary())
    return 0
