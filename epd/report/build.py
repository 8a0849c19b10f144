"""Build ``reports/`` from an exported runs CSV: one folder per backbone and an index README."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

from ..errors import ConfigError, EPDError
from ..io import atomic_write_text, sha256_file
from . import compute_matched, cost, grids, plots, render
from .export import history_path, num, read_history, read_runs, run_field, select_latest
from .external import IR_NOTE, ORIGINAL_SOURCE, parse_external_arg, read_external
from .tables import (PIPELINE, Row, ScoreCache, add_paired, higher_is_better, mark_best, metric_columns, order_rows,
                     rows_from_runs, unique_labels)

log = logging.getLogger(__name__)

__all__ = ["build_report", "missing_rows", "read_expected_rows", "rmse_references", "PLOTS"]

PLOTS = ("metric_vs_nfe.png", "rdpo_curves.png", "distill_loss.png", "epd_tables.png")


def _stage(run: dict) -> str:
    return run.get("tags.stage") or run.get("experiment", "").rpartition("/")[2]


def _stage_runs(runs: list[dict], stage: str, backbone: str) -> list[dict]:
    out = []
    for r in runs:
        if _stage(r) == stage and run_field(r, "backbone") == backbone:
            out.append({**r, "nfe": num(run_field(r, "nfe"))})
    return sorted(out, key=lambda r: (math.inf if math.isnan(r["nfe"]) else r["nfe"], r["run_id"]))


def _load_tables(distill: list[dict], rdpo: list[dict], scores: ScoreCache) -> list[tuple[float, dict]]:
    from ..predictor import load

    by_nfe: dict[float, dict] = {}
    for kind, runs, tag in (("distilled", distill, "table"), ("rdpo", rdpo, "table_best")):
        for r in runs:
            raw = run_field(r, tag)
            path = next((p for p in map(scores.resolve, (raw, raw + ".safetensors")) if p), None) if raw else None
            if path is None:
                if raw:
                    log.warning("%s table %s of run %s not found; left out of epd_tables.png", kind, raw, r["run_id"])
                continue
            try:
                by_nfe.setdefault(r["nfe"], {})[kind] = load(path)
            except EPDError as e:
                log.warning("%s table of run %s unreadable (%s); left out of epd_tables.png", kind, r["run_id"], e)
    return sorted(by_nfe.items(), key=lambda kv: math.inf if math.isnan(kv[0]) else kv[0])


def rmse_references(config: dict) -> dict[str, str]:
    """Backbone -> the reference solve ``rmse_vs_teacher`` compares with, in words, from a (validated) config."""
    out = {}
    for b, sec in (config.get("backbones") or {}).items():
        smp = sec.get("sample") or {}
        if smp.get("reference_solver") and smp.get("reference_steps"):
            out[b] = (f"{smp['reference_solver']} with {smp['reference_steps']} steps "
                      "(config `sample.reference_solver`, `sample.reference_steps`)")
    return out


def _cost_note(rows: list[Row]) -> str | None:
    timed = [r for r in rows if math.isfinite(r.seconds_per_image)]
    if not timed:
        return None
    machines = sorted({r.machine or "machine not recorded" for r in timed})
    batches = sorted({int(r.cost_batch) for r in timed if math.isfinite(r.cost_batch)})
    return (f"s/img: wall-clock seconds per image of the sampling job (sampling and writing; a one-process job "
            "excludes loading the model), "
            f"measured on {'; '.join(machines)}"
            + (f" at batch {', '.join(map(str, batches))}" if batches else "") + "; rows without it: –.")


def _notes(rows: list[Row], externals: dict[str, list[str]], backbone: str, skipped: list[str],
           reference: str | None = None) -> list[str]:
    notes = [n for n in [_cost_note(rows)] if n]
    if reference and any("rmse_vs_teacher" in r.cells for r in rows):
        notes.append(f"RMSE vs teacher: per-image RMSE of the final state against a reference solve from the same "
                     f"noise: {reference}.")
    if skipped:
        notes.append(f"Configured but not run: {', '.join(skipped)} (two-evaluation solvers such as Heun and "
                     "DPM-Solver-2 exist only at even NFE).")
    if any(c.note for r in rows for c in r.cells.values()):
        notes.append(IR_NOTE)
    if any(r.source == ORIGINAL_SOURCE for r in rows):
        notes.append(f"Rows with source '{ORIGINAL_SOURCE}' are read from the original system's result JSONs "
                     f"({', '.join(externals.get(backbone, []))}); SE = std/√(n−1) from the stored population std; "
                     "steps come from the file prefix and the NFE is not recorded there.")
    if any(d.get("note") for r in rows for d in r.paired.values()):
        notes.append("Paired comparisons without a p-value lacked per-image scores (see the Δ column).")
    return notes


def _rdpo_stop_notes(rdpo: list[dict]) -> list[str]:
    """One note per RDPO run that recorded its stopping: the selected checkpoint and why training ended."""
    out = []
    for r in rdpo:
        reason, step = run_field(r, "stop_reason"), run_field(r, "selected_step")
        if reason:
            nfe = "" if math.isnan(r["nfe"]) else f" NFE {r['nfe']:g}"
            out.append(f"RDPO{nfe}: table from step {step or '?'} (best held-out checkpoint); training ended by {reason}.")
    return out


def _write_backbone(bb: str, rows: list[Row], runs: list[dict], history: dict, out: Path, scores: ScoreCache,
                    externals: dict[str, list[str]], within: str, skipped: list[str], reference: str | None,
                    scale: dict | None = None) -> dict:
    rows = order_rows(rows)
    metrics = metric_columns(rows)
    mark_best(rows, metrics, within)
    add_paired(rows, metrics, scores)
    notes = _notes(rows, externals, bb, skipped, reference) + _rdpo_stop_notes(_stage_runs(runs, "rdpo", bb))
    d = out / bb
    atomic_write_text(d / "table.md", render.markdown(bb, rows, metrics, notes, within))
    atomic_write_text(d / "table.tex", render.latex(bb, rows, metrics, notes, within))
    atomic_write_text(d / "table.csv", render.csv_text(bb, rows, metrics))
    if view := compute_matched.report_view(rows, metrics, scores, higher_is_better):
        atomic_write_text(d / "compute_matched.md", view)
    elif (d / "compute_matched.md").exists():  # no EPD row with a candidate now: no view left from an older build
        (d / "compute_matched.md").unlink()
    distill, rdpo = _stage_runs(runs, "distill", bb), _stage_runs(runs, "rdpo", bb)
    made = {"metric_vs_nfe.png": plots.metric_vs_nfe(rows, metrics, d / "metric_vs_nfe.png", bb),
            "rdpo_curves.png": plots.rdpo_curves(rdpo, history, d / "rdpo_curves.png", f"{bb}: RDPO"),
            "distill_loss.png": plots.distill_loss(distill, history, d / "distill_loss.png", f"{bb}: Stage-1 loss"),
            "epd_tables.png": plots.epd_tables(_load_tables(distill, rdpo, scores), d / "epd_tables.png",
                                               f"{bb}: learned EPD tables (distilled vs RDPO)")}
    for name, ok in made.items():          # a plot that has no data now must not survive from an older build
        if not ok and (d / name).exists():
            (d / name).unlink()
    used = [r for r in runs if run_field(r, "backbone") == bb]
    costs = cost.stage_costs(runs, bb, scale)
    if costs:
        atomic_write_text(d / "cost.md", cost.render_cost(bb, costs, runs, scale or {}))
    elif (d / "cost.md").exists():
        (d / "cost.md").unlink()
    return {"labels": unique_labels(rows), "plots": [n for n, ok in made.items() if ok], "rows": len(rows),
            "cost_hours": sum(c.projected_hours for c in costs) if costs else None,
            "grids": grids.write_grids(rows, d, bb),
            "git_sha": sorted({run_field(r, "git_sha") for r in used} - {""}),
            "config_hash": sorted({run_field(r, "config_hash") for r in used} - {""}),
            "external": bool(externals.get(bb))}


def build_report(runs_csv: str | Path, out_dir: str | Path, external=None, backbones=None, *,
                 best_within: str = "nfe", skipped: dict[str, list[str]] | None = None,
                 references: dict[str, str] | None = None,
                 scales: dict[str, dict] | None = None) -> dict[str, list[str]]:
    """Turn an exported runs CSV (and optional original result JSONs) into tables and plots.

    Writes ``<out_dir>/<backbone>/table.{md,tex,csv}``, the PNG plots that have data
    (``metric_vs_nfe``, ``rdpo_curves``, ``distill_loss``, ``epd_tables``) and ``<out_dir>/README.md``.

    Args:
        runs_csv (`str` or `Path`): written by :func:`epd.report.export_runs`; its ``_history.csv`` sibling is
            read for the training curves when present.
        out_dir (`str` or `Path`): report folder (e.g. ``reports``).
        external (`list[str]`, *optional*): folders of the original system's result JSONs, each ``DIR`` or
            ``BACKBONE=DIR``.
        backbones (`list[str]` or `str`, *optional*): only these backbones (comma-separated string accepted).
        best_within (`str`): ``"nfe"`` marks the best value among rows of the same NFE, ``"column"`` per column.
        skipped (`dict[str, list[str]]`, *optional*): backbone -> configured ``solver@NFE`` pairs that cannot run
            (:func:`epd.config.skipped_pairs`), listed in the table notes.
        references (`dict[str, str]`, *optional*): backbone -> the ``rmse_vs_teacher`` reference solve in words
            (:func:`rmse_references`), named once in the table notes.
        scales (`dict[str, dict]`, *optional*): backbone -> its ``paper_scale`` block (:func:`cost.paper_scale`):
            ``cost.md`` projects each stage's per-item time to those counts.

    Returns:
        `dict[str, list[str]]`: backbone -> solver labels of the rows written, in table order.
    """
    runs_csv, out = Path(runs_csv), Path(out_dir)
    runs = select_latest(read_runs(runs_csv))
    by_bb = rows_from_runs([r for r in runs if _stage(r) == "evaluate"])
    externals: dict[str, list[str]] = {}
    for arg in ([external] if isinstance(external, (str, Path)) else external or []):
        bb_override, folder = parse_external_arg(str(arg))
        for bb, rows in read_external(folder, bb_override).items():
            by_bb.setdefault(bb, []).extend(rows)
            externals.setdefault(bb, []).append(folder.name)
    if isinstance(backbones, str):
        backbones = [b.strip() for b in backbones.split(",") if b.strip()]
    if backbones:
        unknown = [b for b in backbones if b not in by_bb]
        if unknown:
            raise ConfigError(f"--backbones: no evaluate runs or external rows for {unknown} in {runs_csv} "
                              f"(have: {', '.join(sorted(by_bb)) or 'none'})")
        by_bb = {b: by_bb[b] for b in backbones}
    if not by_bb:
        raise EPDError(f"runs CSV {runs_csv}: no evaluate runs (experiment epd/evaluate) and no --external rows; "
                       "nothing to report")
    history = read_history(history_path(runs_csv))
    scores = ScoreCache([runs_csv.parent, runs_csv.parent.parent])
    info = {bb: _write_backbone(bb, by_bb[bb], runs, history, out, scores, externals, best_within,
                                (skipped or {}).get(bb, []), (references or {}).get(bb), (scales or {}).get(bb))
            for bb in sorted(by_bb)}
    atomic_write_text(out / "README.md", _readme(info, runs_csv, best_within))
    return {bb: i["labels"] for bb, i in info.items()}


def _readme(info: dict, runs_csv: Path, within: str) -> str:
    lines = ["# Reports", "",
             f"Generated by `epd report` from `{runs_csv.name}` (sha256 `{sha256_file(runs_csv)[:16]}`), an export "
             "of the MLflow runs; no number here is typed by hand. Rebuild with `epd report --build-only`.", "",
             "## Backbones", ""]
    for bb, i in info.items():
        lines += [f"### {bb}", "",
                  f"- Table ({i['rows']} rows): [Markdown]({bb}/table.md) · [LaTeX]({bb}/table.tex) · "
                  f"[CSV]({bb}/table.csv)",
                  f"- Runs: git sha {', '.join(f'`{s}`' for s in i['git_sha']) or 'not recorded'}; config hash "
                  f"{', '.join(f'`{s}`' for s in i['config_hash']) or 'not recorded'}"
                  + ("; includes rows from the original RLEPD result files" if i["external"] else "")]
        if i["cost_hours"] is not None:
            lines.append(f"- Cost: [per stage]({bb}/cost.md), {i['cost_hours']:.3g} hours projected at paper scale")
        lines += [f"- ![{n[:-4]}]({bb}/{n})" for n in i["plots"]]
        lines += [f"- Samples: ![{n[:-4]}]({bb}/{n})" for n in i["grids"]]
        lines.append("")
    lines += ["## How the columns are counted", "",
              "- **Steps**: solver steps (grid intervals) of the sampling run.",
              "- **NFE**: the paper's NFE, counted in sequential network evaluations: an EPD step counts 2 (one "
              "evaluation at the step start plus one batched call over its K intermediate points), the analytic "
              "first step (AFS) saves one, and a classifier-free-guidance pair counts as one.",
              "- **Fwd passes**: network forward passes per sample: each of the K intermediate points counts, and "
              "CFG doubles the count (conditional + unconditional).",
              "- **s/img**: wall-clock seconds per image of the sampling job, as `epd sample` recorded it in its "
              "folder; the table notes name the machine and batch size.",
              "- **Sample grids** (`grid_nfe<N>.png`, `grid_overview.png`): cut from the sampled folders (nothing "
              "re-sampled); every row shows the same seeds and prompts.",
              "- **Metric cells**: mean ± standard error over images (SE = sample std / √n). Set metrics (FD, FID) "
              "are one number per image set and carry no SE. ↑ higher is better, ↓ lower is better.",
              f"- **Bold**: the best value in its column{' among rows with the same NFE' if within == 'nfe' else ''}"
              " (ties all bold).",
              "- **p**: EPD rows are compared with the best baseline at the same NFE on each metric, paired by "
              "(seed, prompt), two-sided paired t-test (`epd.metrics.stats.paired_diff`).",
              f"- **Source**: `{PIPELINE}` or `{ORIGINAL_SOURCE}` (result JSONs of the original system; ImageReward "
              "converted to the official normalisation, see the table footnote).", ""]
    return "\n".join(lines)


def read_expected_rows(path: str | Path) -> dict[str, list[str]]:
    """Read ``{backbone: [solver label or "label@NFE", ...]}`` from a JSON file, validating its shape."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--expect-rows {path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--expect-rows {path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not all(isinstance(v, list) and all(isinstance(x, str) for x in v)
                                            for v in doc.values()):
        raise ConfigError(f'--expect-rows {path}: expected {{"backbone": ["solver", "solver@NFE", ...]}}')
    return doc


def missing_rows(expected: dict[str, list[str]], out_dir: str | Path) -> list[str]:
    """Expected rows absent from the written ``<out_dir>/<backbone>/table.csv`` files.

    Args:
        expected (`dict`): backbone -> labels; ``"euler"`` needs a row of that solver at any NFE, ``"euler@10"``
            one at NFE 10.
        out_dir (`str` or `Path`): the report folder.

    Returns:
        `list[str]`: ``"<backbone>: <label>"`` for every missing row (empty when all are there).
    """
    missing = []
    for bb, labels in expected.items():
        path = Path(out_dir) / bb / "table.csv"
        have: set[tuple[str, float]] = set()
        if path.is_file():
            with open(path, newline="", encoding="utf-8") as f:
                have = {(r["solver"], num(r["nfe"])) for r in csv.DictReader(f)}
        for label in labels:
            solver, _, nfe = label.partition("@")
            ok = any(s == solver and (not nfe or n == num(nfe)) for s, n in have)
            if not ok:
                missing.append(f"{bb}: {label}" + ("" if path.is_file() else " (no table written)"))
    return missing
