"""Prompt sets: files (txt/csv) or built-in sets, and the seed -> prompt pairing rule.

A prompt spec is ``builtin:<name>``, a path to a ``.txt``/``.csv`` prompt file, or such a path followed by a
Python-style row slice, ``FILE[start:stop]`` (e.g. ``captions.csv[:29000]`` for a training stream and
``captions.csv[29000:]`` for held-out prompts disjoint from it).

The ``i``-th seed of a run uses prompt ``i mod len(prompts)`` (the original SD3/FLUX samplers' cycling rule),
so a prompt file and a seed range fully determine every sample.
"""

from __future__ import annotations

import re

from .errors import ConfigError
from .io import read_prompts

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

BUILTIN = {
    "digits": [f"a handwritten digit {w}" for w in DIGIT_WORDS],
}

_SLICE = re.compile(r"^(?P<path>.+?)\[(?P<start>-?\d*):(?P<stop>-?\d*)\]$")


def split_spec(spec: str) -> tuple[str, slice | None]:
    """``"FILE[a:b]"`` -> ``("FILE", slice(a, b))``; a spec without a slice -> ``(spec, None)``."""
    m = _SLICE.match(spec)
    if not m:
        return spec, None
    start, stop = (int(v) if v else None for v in (m["start"], m["stop"]))
    return m["path"], slice(start, stop)


def prompt_file(spec: str) -> str | None:
    """The file a prompt spec reads (None for a built-in set)."""
    if not isinstance(spec, str) or spec.startswith("builtin:"):
        return None
    return split_spec(spec)[0]


def resolve_prompts(spec: str) -> list[str]:
    """The prompts of ``spec``: ``builtin:<name>``, a prompt file, or ``FILE[start:stop]``."""
    if isinstance(spec, str) and spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN:
            raise ConfigError(f"prompts: unknown built-in set {name!r}; accepted: {sorted(BUILTIN)}")
        return list(BUILTIN[name])
    path, rows = split_spec(spec)
    prompts = read_prompts(path)
    if rows is None:
        return prompts
    picked = prompts[rows]
    if not picked:
        raise ConfigError(f"prompts: {spec!r} selects no rows ({path} has {len(prompts)} prompts)")
    return picked


def pair(prompts: list[str], seeds: list[int]) -> list[str]:
    """Prompt for each seed position (cycling)."""
    return [prompts[i % len(prompts)] for i in range(len(seeds))]
