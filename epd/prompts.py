"""Prompt sets: files (txt/csv) or built-in sets, and the seed -> prompt pairing rule.

The ``i``-th seed of a run uses prompt ``i mod len(prompts)`` (the original SD3/FLUX samplers' cycling rule),
so a prompt file and a seed range fully determine every sample.
"""

from __future__ import annotations

from .io import read_prompts

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

BUILTIN = {
    "digits": [f"a handwritten digit {w}" for w in DIGIT_WORDS],
}


def resolve_prompts(spec: str) -> list[str]:
    """``builtin:<name>`` or a path to a ``.txt``/``.csv`` prompt file."""
    if isinstance(spec, str) and spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN:
            from .errors import ConfigError

            raise ConfigError(f"prompts: unknown built-in set {name!r}; accepted: {sorted(BUILTIN)}")
        return list(BUILTIN[name])
    return read_prompts(spec)


def pair(prompts: list[str], seeds: list[int]) -> list[str]:
    """Prompt for each seed position (cycling)."""
    return [prompts[i % len(prompts)] for i in range(len(seeds))]
