"""Table rows from exported evaluate runs: metric cells, best-per-column marks and paired p-values.

A row is one (solver, NFE) evaluation. Image metrics carry ``mean ± SE`` over images (the evaluate run's
``<metric>_mean``/``<metric>_se``/``<metric>_count``); set metrics (Fréchet distances) carry one number. The
writers live in :mod:`epd.report.render`.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EPDError
from .export import num, run_field

log = logging.getLogger(__name__)

__all__ = ["Cell", "Row", "higher_is_better", "is_set_metric", "rows_from_runs", "order_rows", "metric_columns",
           "mark_best", "add_paired", "ScoreCache", "METRIC_LABELS", "unique_labels", "PIPELINE"]

PIPELINE = "this pipeline"
METRIC_ORDER = ("hps", "pickscore", "imagereward", "clip", "aesthetic", "mps", "fid_clean", "digits_alignment",
                "digits_realism", "digits_accuracy", "digits_fd", "rmse_vs_teacher")
METRIC_LABELS = {"hps": "HPSv2.1", "pickscore": "PickScore", "imagereward": "ImageReward", "clip": "CLIP",
                 "aesthetic": "Aesthetic", "mps": "MPS", "fid_clean": "FID (clean)", "digits_alignment": "Alignment",
                 "digits_realism": "Realism", "digits_accuracy": "Accuracy", "digits_fd": "FD",
                 "rmse_vs_teacher": "RMSE vs teacher"}
SOLVER_ORDER = ("euler", "ddim", "heun", "edm", "dpm2", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "ipndm3")
_LOWER = re.compile(r"(^|_)(fd|fid|kid|rmse|mse|loss|error)(_|$)")
_SET = re.compile(r"(^|_)(fd|fid|kid)(_|$)")
_STAT_SUFFIXES = ("_mean", "_se", "_std", "_count")


def higher_is_better(metric: str) -> bool:
    """False for distances and errors (``*fd*``, ``fid*``, ``kid``, ``rmse*``, ``loss``), True otherwise."""
    return not _LOWER.search(metric)


def is_set_metric(metric: str) -> bool:
    """A metric computed once per image set (no per-image scores, no SE), e.g. ``fid_clean``, ``digits_fd``."""
    from ..rewards import scorer_kind

    try:
        return scorer_kind(metric) == "set"
    except EPDError:
        return bool(_SET.search(metric))


@dataclass
class Cell:
    mean: float
    se: float = math.nan
    n: int | None = None
    note: str = ""          # footnote marker shown after the value


@dataclass
class Row:
    """One table row (a solver at one NFE) and everything computed for it."""

    solver: str
    steps: float = math.nan
    nfe: float = math.nan
    nfe_sequential: float = math.nan
    forward_passes: float = math.nan
    source: str = PIPELINE
    run_id: str = ""
    scores_csv: str = ""
    images_dir: str = ""                  # the sampled folder (grids are cut from it)
    seconds_per_image: float = math.nan   # sampling wall clock per image, as `epd sample` recorded it
    cost_batch: float = math.nan          # ... at this batch size
    machine: str = ""                     # ... on this device
    cells: dict[str, Cell] = field(default_factory=dict)
    best: set[str] = field(default_factory=set)
    paired: dict[str, dict] = field(default_factory=dict)

    @property
    def is_epd(self) -> bool:
        return self.solver.startswith("epd")

    @property
    def group(self):
        """Rows compared with each other share an NFE (unknown NFEs form one group)."""
        return "?" if math.isnan(self.nfe) else self.nfe


def _cells(run: dict) -> dict[str, Cell]:
    cells: dict[str, Cell] = {}
    names = [c[len("metrics."):] for c, v in run.items() if c.startswith("metrics.") and v not in (None, "")]
    for name in names:
        if name.endswith("_mean"):
            m = name[: -len("_mean")]
            count = num(run.get(f"metrics.{m}_count"))
            cells[m] = Cell(num(run[f"metrics.{name}"]), num(run.get(f"metrics.{m}_se")),
                            None if math.isnan(count) else int(count))
    for name in names:
        if name not in cells and not name.endswith(_STAT_SUFFIXES) and is_set_metric(name):
            cells[name] = Cell(num(run[f"metrics.{name}"]))
    return {m: c for m, c in cells.items() if math.isfinite(c.mean)}


def rows_from_runs(runs: list[dict]) -> dict[str, list[Row]]:
    """Group exported evaluate runs into rows per backbone.

    Args:
        runs (`list[dict]`): rows of the runs CSV (already filtered to evaluate runs).

    Returns:
        `dict[str, list[Row]]`: backbone -> rows (unordered).
    """
    out: dict[str, list[Row]] = {}
    for r in runs:
        bb, solver = run_field(r, "backbone"), run_field(r, "solver")
        if not bb or not solver:
            log.warning("evaluate run %s has no backbone/solver tag; left out of the report", r.get("run_id"))
            continue
        row = Row(solver=solver, steps=num(run_field(r, "steps")), nfe=num(run_field(r, "nfe")),
                  nfe_sequential=num(run_field(r, "nfe_sequential")),
                  forward_passes=num(run_field(r, "forward_passes")), run_id=r.get("run_id", ""),
                  scores_csv=run_field(r, "scores_csv"), images_dir=run_field(r, "images_dir"),
                  seconds_per_image=num(run_field(r, "seconds_per_image")), cost_batch=num(run_field(r, "cost_batch")),
                  machine=run_field(r, "machine"), cells=_cells(r))
        out.setdefault(bb, []).append(row)
    return out


def order_rows(rows: list[Row]) -> list[Row]:
    """NFE ascending (unknown last), baselines before EPD, baselines in a fixed solver order."""
    def key(r: Row):
        base = r.solver.split("_step")[0]
        rank = SOLVER_ORDER.index(base) if base in SOLVER_ORDER else len(SOLVER_ORDER)
        return (math.isnan(r.nfe), 0.0 if math.isnan(r.nfe) else r.nfe, r.source != PIPELINE, r.is_epd, rank,
                r.solver)
    return sorted(rows, key=key)


def metric_columns(rows: list[Row]) -> list[str]:
    """Metrics present in any row: the usual paper order first, then the rest alphabetically."""
    present = {m for r in rows for m in r.cells}
    return [m for m in METRIC_ORDER if m in present] + sorted(present - set(METRIC_ORDER))


def _best_of(candidates: list[Row], metric: str) -> float:
    vals = [r.cells[metric].mean for r in candidates]
    return max(vals) if higher_is_better(metric) else min(vals)


def mark_best(rows: list[Row], metrics: list[str], within: str = "nfe") -> None:
    """Set ``row.best`` to the metrics where the row holds the best value (ties: all of them).

    Args:
        rows (`list[Row]`): one table's rows.
        metrics (`list[str]`): its metric columns.
        within (`str`): ``"nfe"`` compares rows of the same NFE (paper style: best at each budget), ``"column"``
            the whole column.
    """
    if within not in ("nfe", "column"):
        raise EPDError(f"best_within: expected 'nfe' or 'column', got {within!r}")
    for r in rows:
        r.best.clear()
    groups: dict = {}
    for r in rows:
        groups.setdefault(r.group if within == "nfe" else 0, []).append(r)
    for members in groups.values():
        for m in metrics:
            have = [r for r in members if m in r.cells]
            if not have:
                continue
            target = _best_of(have, m)
            for r in have:
                if r.cells[m].mean == target:
                    r.best.add(m)


class ScoreCache:
    """Per-image score CSVs (columns ``seed``, ``prompt`` and one per metric), read once, keyed by (seed, prompt).

    Args:
        search (`list[Path]`): folders a relative ``scores_csv`` path is tried against after the working directory.
    """

    def __init__(self, search: list[Path] = ()):
        self.search = [Path(p) for p in search]
        self._files: dict[Path, dict] = {}

    def resolve(self, path: str) -> Path | None:
        p = Path(path)
        for cand in [p] if p.is_absolute() else [p, *(s / p for s in self.search)]:
            if cand.is_file():
                return cand
        return None

    def _load(self, path: Path) -> dict:
        if path not in self._files:
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                cols = reader.fieldnames or []
                if "seed" not in cols or "prompt" not in cols:
                    raise EPDError(f"per-image scores {path}: needs columns 'seed' and 'prompt' (has {cols})")
                rows: dict[tuple[str, str], dict] = {}
                for r in reader:
                    key = (r["seed"].strip(), r["prompt"])
                    if key in rows:
                        raise EPDError(f"per-image scores {path}: seed {key[0]} with prompt {key[1]!r} appears twice; "
                                       "paired statistics need one image per (seed, prompt)")
                    rows[key] = r
            self._files[path] = rows
        return self._files[path]

    def column(self, path: str, metric: str) -> dict[tuple[str, str], float] | None:
        """``{(seed, prompt): score}`` of one metric, or None when the file or column is missing."""
        p = self.resolve(path) if path else None
        if p is None:
            return None
        rows = self._load(p)
        if rows and metric not in next(iter(rows.values())):
            return None
        try:
            return {k: float(r[metric]) for k, r in rows.items()}
        except ValueError as e:
            raise EPDError(f"per-image scores {p}: column {metric!r} holds a non-number ({e})") from None


def add_paired(rows: list[Row], metrics: list[str], scores: ScoreCache) -> None:
    """For each EPD row and image metric: paired difference against the best baseline at the same NFE.

    The baseline is the non-EPD row of the same NFE with the best mean on that metric. Images are paired by
    (seed, prompt); the statistic is :func:`epd.metrics.stats.paired_diff` (paired t-test). Results go to
    ``row.paired[metric]`` as ``{vs, vs_run, diff, se, t, p, n}`` (``p`` NaN and a ``note`` when a per-image
    file is missing).
    """
    from ..metrics.stats import paired_diff

    for epd in (r for r in rows if r.is_epd and r.source == PIPELINE):
        epd.paired.clear()
        for m in (m for m in metrics if m in epd.cells and not is_set_metric(m)):
            cands = [r for r in rows if not r.is_epd and r.group == epd.group and m in r.cells]
            if not cands:
                continue
            target = _best_of(cands, m)
            base = next(r for r in cands if r.cells[m].mean == target)
            res = {"vs": base.solver, "vs_run": base.run_id, "diff": math.nan, "se": math.nan, "t": math.nan,
                   "p": math.nan, "n": 0}
            a, b = scores.column(epd.scores_csv, m), scores.column(base.scores_csv, m)
            if a is None or b is None:
                missing = epd if a is None else base
                res["note"] = (f"no per-image {m} scores for {missing.solver} "
                               f"({missing.scores_csv or 'no scores_csv tag'})")
                log.warning("paired test %s vs %s on %s skipped: %s", epd.solver, base.solver, m, res["note"])
            else:
                keys = sorted(set(a) & set(b))
                if len(keys) < len(a) or len(keys) < len(b):
                    log.warning("paired test %s vs %s on %s: %d of %d/%d images share (seed, prompt)",
                                epd.solver, base.solver, m, len(keys), len(a), len(b))
                if len(keys) < 2:
                    res["note"] = f"fewer than 2 images of {epd.solver} and {base.solver} share (seed, prompt)"
                else:
                    res.update(paired_diff([a[k] for k in keys], [b[k] for k in keys]))
            epd.paired[m] = res


def unique_labels(rows: list[Row]) -> list[str]:
    """Solver labels in table order, each once."""
    return list(dict.fromkeys(r.solver for r in rows))

