"""``epd backbone check``: resolve every weight file a study needs before any job loads one.

Checks the backbone's folder and the weights of every configured metric and RDPO reward (each scorer, the FID
Inception network) in one pass. Writes a small JSON (resolved paths) for the workflow; with anything missing it
fails at once with one error listing every missing file and every place it was looked for
(see :mod:`epd.backbones.weights`).
"""

from __future__ import annotations

from ..config import backbone_section, load_config
from ..io import atomic_write_json
from .weights import check_all


def add_arguments(p):
    p.add_argument("--config", required=True, help="the study's YAML config")
    p.add_argument("--backbone", required=True, help="backbone name (a key of the config's backbones)")
    p.add_argument("--out", required=True, help="JSON file with the resolved paths")


def study_weights(sec: dict) -> list[tuple[str, str]]:
    """``(kind, name)`` weight specs of a backbone section: the backbone, then every metric's and reward's."""
    from ..rewards import required_weights

    scorers = list(sec.get("metrics") or []) + list(((sec.get("rdpo") or {}).get("rewards") or {}))
    pairs = [("backbone", sec["kind"])]
    for s in scorers:
        pairs += [w for w in required_weights(s) if w not in pairs]
    return pairs


def run(args):
    sec = backbone_section(load_config(args.config), args.backbone)
    kind = sec["kind"]
    from . import backbone_class

    found = check_all(study_weights(sec), explicit={kind: sec.get("model_path")})
    cls = backbone_class(kind)
    if cls.needs_weights_check:
        cls.check(sec)  # every required file of the folder, without loading weights
    atomic_write_json(args.out, {"backbone": args.backbone, "kind": kind,
                                 "paths": {f"{k}/{n}": str(p) for (k, n), p in found.items()}})
    print(f"{args.backbone}: weights found at {found[('backbone', kind)]} "
          f"(+ {len(found) - 1} scorer file(s))")
    return 0
