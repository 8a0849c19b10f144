"""``epd backbone check``: resolve a real backbone's local weights before any job loads them.

Writes a small JSON (resolved paths) for the workflow; with weights missing it fails at once, listing every
place looked and the ``dvc pull`` target (see :mod:`epd.backbones.weights`).
"""

from __future__ import annotations

from ..config import backbone_section, load_config
from ..io import atomic_write_json
from .weights import check_all


def add_arguments(p):
    p.add_argument("--config", required=True)
    p.add_argument("--backbone", required=True)
    p.add_argument("--out", required=True, help="JSON file with the resolved paths")


def run(args):
    sec = backbone_section(load_config(args.config), args.backbone)
    kind = sec["kind"]
    import importlib

    from . import KINDS

    found = check_all([("backbone", kind)], explicit={kind: sec.get("model_path")})
    mod = importlib.import_module(KINDS[kind])
    if hasattr(mod, "check"):
        mod.check(sec)  # every required file of the folder, without loading weights
    atomic_write_json(args.out, {"backbone": args.backbone, "kind": kind,
                                 "paths": {f"{k}/{n}": str(p) for (k, n), p in found.items()}})
    print(f"{args.backbone}: weights found at {found[('backbone', kind)]}")
    return 0
