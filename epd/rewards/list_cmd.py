"""``epd metrics list``: print the registered scorer names (nothing heavy is imported)."""

from __future__ import annotations

import json


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print a JSON list of {name, kind, weights, description}")


def run(args) -> int:
    from . import list_scorers, required_weights, scorer_kind

    rows = [{"name": n, "kind": scorer_kind(n), "weights": [w for _, w in required_weights(n)], "description": d}
            for n, d in list_scorers()]
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['kind']:<5}  {r['description']}")
    return 0
