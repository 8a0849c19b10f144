"""``epd report``: export MLflow runs to CSV, then build paper tables and plots under ``reports/``.

Two steps, so Snakemake can track the frozen export:

1. export (:func:`export_runs`): MLflow -> ``runs.csv`` + ``runs_history.csv`` (the workflow keeps them per
   study, under ``results/studies/<study>/``);
2. build (:func:`build_report`): CSV (+ the original system's result JSONs) ->
   ``reports/<backbone>/table.{md,tex,csv}``, PNG plots, sample grids cut from the sampled folders
   (``grid_nfe<N>.png``, ``grid_overview.png``) and ``reports/README.md``.

Example:
    epd report --tracking-uri sqlite:///results/mlflow.db --runs-csv results/runs.csv --out reports \\
        --external data/original/results/flux_baseline_eval_20260402 --config configs/flux_dev.yaml
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import ConfigError
from .build import build_report, missing_rows, read_expected_rows
from .export import export_runs, history_path

__all__ = ["export_runs", "build_report", "missing_rows", "history_path", "add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI to export from (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--runs-csv", default="results/runs.csv",
                   help="exported runs CSV (written by the export step, read by the build step); the metric "
                        "histories go to <stem>_history.csv beside it")
    p.add_argument("--out", default="reports", help="report folder")
    p.add_argument("--external", action="extend", nargs="+", default=[], metavar="[BACKBONE=]DIR",
                   help="folder(s) of the original system's result JSONs to add as rows (source: original RLEPD)")
    p.add_argument("--backbones", default=None, help="comma-separated backbones to report (default: all)")
    p.add_argument("--best-within", choices=("nfe", "column"), default="nfe",
                   help="mark the best value among rows of the same NFE (default) or per whole column")
    step = p.add_mutually_exclusive_group()
    step.add_argument("--export-only", action="store_true", help="only export MLflow runs to --runs-csv")
    step.add_argument("--build-only", action="store_true", help="only build the report from --runs-csv")
    p.add_argument("--config", default=None,
                   help="the study's config: its solver/NFE pairs that cannot run are listed in the table notes, and "
                        "its reference solve (sample.reference_solver/_steps) is named in the RMSE note, and each "
                        "backbone's paper_scale block sets the counts cost.md projects to")
    p.add_argument("--expect-rows", default=None, metavar="FILE.json",
                   help='{"backbone": ["solver", "solver@NFE", ...]}: exit 1 naming every row missing from the tables')


def run(args) -> int:
    if args.export_only and args.expect_rows:
        raise ConfigError("--expect-rows checks the built tables; drop --export-only")
    expected = read_expected_rows(args.expect_rows) if args.expect_rows else None
    if not args.build_only:
        uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise ConfigError("--tracking-uri: not given and MLFLOW_TRACKING_URI is not set; pass the MLflow URI "
                              "(e.g. sqlite:///results/mlflow.db) or use --build-only with an existing --runs-csv")
        s = export_runs(uri, args.runs_csv)
        print(f"exported {s['runs']} runs -> {s['runs_csv']} ({s['history_rows']} history points -> "
              f"{s['history_csv']})")
    if args.export_only:
        return 0
    skipped = references = scales = None
    if args.config:
        from ..config import load_config, skipped_pairs
        from .build import rmse_references
        from .cost import paper_scale

        cfg = load_config(args.config)
        skipped, references = skipped_pairs(cfg), rmse_references(cfg)
        scales = {b: paper_scale(sec) for b, sec in (cfg.get("backbones") or {}).items()}
    written = build_report(args.runs_csv, args.out, external=args.external, backbones=args.backbones,
                           best_within=args.best_within, skipped=skipped, references=references, scales=scales)
    for bb, labels in written.items():
        print(f"{args.out}/{bb}: {', '.join(labels)}")
    if expected is not None:
        missing = missing_rows(expected, args.out)
        if missing:
            print("epd report: missing rows:\n  " + "\n  ".join(missing), file=sys.stderr)
            return 1
        print(f"all {sum(map(len, expected.values()))} expected rows present")
    return 0
