"""``epd backbone check``: resolve every weight file a study needs before any job loads one.

Checks the backbone's folder and the weights of every configured metric and RDPO reward (each scorer, the FID
Inception network) in one pass. Writes a small JSON (resolved paths) for the workflow; with anything missing it
fails at once with one error listing every missing file and every place it was looked for
(see :mod:`epd.backbones.weights`). Then every configured scorer is loaded once on the CPU, one at a time and freed:
a checkpoint of the wrong architecture or shape fails here, naming its file, before any job uses the GPU
(``--no-load-scorers`` skips it).
"""

from __future__ import annotations

from ..config import backbone_section, load_config
from ..io import atomic_write_json
from .weights import check_all


def add_arguments(p):
    p.add_argument("--config", required=True, help="the study's YAML config")
    p.add_argument("--backbone", required=True, help="backbone name (a key of the config's backbones)")
    p.add_argument("--out", required=True, help="JSON file with the resolved paths")
    p.add_argument("--no-load-scorers", action="store_true",
                   help="only check that the scorers' files exist (default: also load each on the CPU, so that a "
                        "checkpoint of the wrong shape fails now rather than in an evaluation job)")


def study_weights(sec: dict) -> list[tuple[str, str]]:
    """``(kind, name)`` weight specs of a backbone section: the backbone, then every metric's and reward's."""
    from ..rewards import required_weights

    scorers = list(sec.get("metrics") or []) + list(((sec.get("rdpo") or {}).get("rewards") or {}))
    pairs = [("backbone", sec["kind"])]
    for s in scorers:
        pairs += [w for w in required_weights(s) if w not in pairs]
    return pairs


def load_scorers(sec: dict) -> list[str]:
    """Load every metric and reward scorer of ``sec`` on the CPU, one at a time (each freed before the next): their
    checkpoints' keys and shapes are checked against the architecture (errors name the file)."""
    import gc

    from ..rewards import get_scorer, list_scorers, required_weights, scorer_kind

    known = {n for n, _ in list_scorers()}
    wanted = list(sec.get("metrics") or []) + list(((sec.get("rdpo") or {}).get("rewards") or {}))
    # image scorers with released weights (the set metrics' and the digits backbone's own heads are checked elsewhere)
    names = [s for s in dict.fromkeys(wanted) if s in known and scorer_kind(s) == "image" and required_weights(s)]
    for name in names:
        scorer = get_scorer(name, device="cpu")
        del scorer
        gc.collect()
    return names


def run(args):
    sec = backbone_section(load_config(args.config), args.backbone)
    kind = sec["kind"]
    from . import backbone_class

    found = check_all(study_weights(sec), explicit={kind: sec.get("model_path")})
    cls = backbone_class(kind)
    if cls.needs_weights_check:
        cls.check(sec)  # every required file of the folder, without loading weights
    loaded = [] if args.no_load_scorers else load_scorers(sec)
    atomic_write_json(args.out, {"backbone": args.backbone, "kind": kind,
                                 "paths": {f"{k}/{n}": str(p) for (k, n), p in found.items()}})
    print(f"{args.backbone}: weights found at {found[('backbone', kind)]} "
          f"(+ {len(found) - 1} scorer file(s); {len(loaded)} scorer(s) loaded and checked)")
    return 0
