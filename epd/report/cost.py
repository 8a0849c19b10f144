"""What a study cost per stage, from its MLflow runs, and what the paper-scale study would cost.

Every job's MLflow run has a start and an end time; a stage's *per-item* time is the wall time of its runs over the
items they processed (teacher trajectories, distillation iterations, RDPO steps, sampled images, evaluated images).
The projection multiplies it by the items of the paper-scale study, per run: ``paper_scale.eval_prompts`` images
per sampled or evaluated row, ``paper_scale.teacher_seeds`` trajectories per teacher set,
``paper_scale.distill_iterations`` per distillation and ``paper_scale.rdpo_steps`` per RDPO run (config keys of the
backbone; each defaults to the study's own count). A run's wall time may include loading models, so at small counts
the per-item times, and the projections, are upper bounds.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime

from ..errors import ConfigError
from ..io import parse_seeds
from .export import run_field

__all__ = ["StageCost", "PAPER_SCALE_KEYS", "stage_costs", "paper_scale", "projected_hours", "render_cost"]

STAGES = ("teacher", "distill", "rdpo", "sample", "evaluate")
UNITS = {"teacher": "trajectories", "distill": "iterations", "rdpo": "steps", "sample": "images",
         "evaluate": "images (all metrics)"}
# stage -> the paper_scale key of its items per run
PAPER_SCALE_KEYS = {"teacher": "teacher_seeds", "distill": "distill_iterations", "rdpo": "rdpo_steps",
                    "sample": "eval_prompts", "evaluate": "eval_prompts"}
ORIGINAL_RDPO = ("the original system's SD3-Medium 1024 RDPO run alone took 141,436 s on one H200 "
                 "(39.3 H200-hours, 8,966 steps)")


@dataclass
class StageCost:
    """One stage of one backbone: measured runs and the paper-scale projection."""
    stage: str
    runs: int
    seconds: float
    items: float
    paper_items: float

    @property
    def per_item_s(self) -> float:
        return self.seconds / self.items if self.items else math.nan

    @property
    def projected_hours(self) -> float:
        return projected_hours(self.per_item_s, self.paper_items)


def projected_hours(per_item_s: float, paper_items: float) -> float:
    """Hours of ``paper_items`` items at ``per_item_s`` seconds each."""
    return per_item_s * paper_items / 3600


def _seconds(run: dict) -> float:
    """A run's wall time from its exported ISO-8601 start and end times (NaN when either is missing)."""
    try:
        t0, t1 = (datetime.fromisoformat(run[k]) for k in ("start_time", "end_time"))
    except (KeyError, TypeError, ValueError):
        return math.nan
    return (t1 - t0).total_seconds()


def _count_seeds(text: str) -> float:
    """Seeds in a recorded spec: ``"0-127 (128)"`` (teacher) or a plain spec such as ``"900000-900099"``."""
    if m := re.search(r"\((\d+)\)\s*$", text):
        return float(m.group(1))
    try:
        return float(len(parse_seeds(text)))
    except ConfigError:  # an unreadable spec counts as unknown
        return math.nan


def run_items(run: dict, stage: str) -> float:
    """Items one run processed (NaN when the run did not record them)."""
    field = {"teacher": "seeds", "sample": "seeds", "distill": "iterations", "evaluate": "num_images"}.get(stage)
    if stage == "rdpo":  # steps actually trained: a stopped run records stopped_at
        text = run_field(run, "stopped_at") or run_field(run, "steps")
    else:
        text = run_field(run, field)
    if stage in ("teacher", "sample"):
        return _count_seeds(text)
    try:
        return float(text)
    except ValueError:
        return math.nan


def paper_scale(section: dict | None) -> dict:
    """The backbone section's ``paper_scale`` block (absent keys: the study's own counts)."""
    return dict((section or {}).get("paper_scale") or {})


def stage_costs(runs: list[dict], backbone: str, scale: dict | None = None) -> list[StageCost]:
    """Per stage of ``backbone``: runs, wall seconds, items, and paper-scale items (``scale`` from
    :func:`paper_scale`; a missing key keeps each run's own count)."""
    out = []
    for stage in STAGES:
        used = [r for r in runs if run_field(r, "stage") == stage and run_field(r, "backbone") == backbone]
        timed = [(r, _seconds(r), run_items(r, stage)) for r in used]
        timed = [(r, s, n) for r, s, n in timed if math.isfinite(s) and math.isfinite(n) and n > 0]
        if not timed:
            continue
        target = (scale or {}).get(PAPER_SCALE_KEYS[stage])
        out.append(StageCost(stage, len(timed), sum(s for _, s, _ in timed), sum(n for _, _, n in timed),
                             sum(float(target) if target else n for _, _, n in timed)))
    return out


def _machines(runs: list[dict], backbone: str) -> str:
    names = sorted({run_field(r, "gpu") or f"no GPU ({run_field(r, 'host_platform') or 'host not recorded'})"
                    for r in runs if run_field(r, "backbone") == backbone and run_field(r, "stage") in STAGES})
    return "; ".join(names) or "not recorded"


def render_cost(backbone: str, costs: list[StageCost], runs: list[dict], scale: dict) -> str:
    """``cost.md``: the measured stages and their paper-scale projection."""
    lines = [f"# {backbone}: cost per stage", "",
             "| stage | runs | wall s | items | s per item | paper-scale items | projected hours |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for c in costs:
        lines.append(f"| {c.stage} | {c.runs} | {c.seconds:.1f} | {c.items:g} {UNITS[c.stage]} | "
                     f"{c.per_item_s:.3g} | {c.paper_items:g} | {c.projected_hours:.3g} |")
    total = sum(c.projected_hours for c in costs)
    lines.append(f"| **total** | {sum(c.runs for c in costs)} | {sum(c.seconds for c in costs):.1f} | | | | "
                 f"**{total:.3g}** |")
    given = ", ".join(f"{k} {v}" for k, v in sorted(scale.items())) or "none (the study's own counts)"
    lines += ["", f"Measured on: {_machines(runs, backbone)}.",
              "Wall time per run is its MLflow start-to-end time (a job's work while its run is open, which may "
              "include loading models), so at small counts the per-item times and projections are upper bounds.",
              f"Paper scale (config `paper_scale`): {given}; sampled and evaluated rows, teacher sets, distillations "
              "and RDPO runs as in this study.", f"For scale: {ORIGINAL_RDPO}.", ""]
    return "\n".join(lines)
