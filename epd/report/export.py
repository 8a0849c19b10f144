"""Freeze MLflow runs into CSV files so Snakemake can track the report's input.

``<runs>.csv`` holds one row per selected run (experiment name, run id, status, start/end time, then every
``tags.*``, ``params.*`` and ``metrics.*`` column, each group sorted); ``<runs>_history.csv`` holds the metric
histories (``run_id, key, step, value``) of the Stage-1 and Stage-2 runs, whose curves the report plots.

Selection: only FINISHED runs; where several share (experiment, backbone, solver, nfe), the one that started
last is kept (ties broken by run id), so re-running a job replaces its row instead of adding one.
"""

from __future__ import annotations

import csv
import io
import math
from datetime import datetime, timezone
from pathlib import Path

from ..errors import EPDError
from ..io import atomic_write_text

__all__ = ["export_runs", "read_runs", "read_history", "select_latest", "history_path", "num", "run_field"]

RUN_COLUMNS = ("experiment", "run_id", "status", "start_time", "end_time")
HISTORY_COLUMNS = ("run_id", "key", "step", "value")
HISTORY_EXPERIMENTS = ("epd/rdpo", "epd/distill")
_PAGE = 1000


def history_path(runs_csv: str | Path) -> Path:
    """``results/runs.csv`` -> ``results/runs_history.csv``."""
    p = Path(runs_csv)
    return p.with_name(p.stem + "_history.csv")


def num(value) -> float:
    """Parse a CSV/tag value as float; empty or missing gives NaN."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def run_field(run: dict, name: str) -> str:
    """First non-empty of ``tags.<name>``, ``params.<name>``, ``metrics.<name>`` in an exported row."""
    for prefix in ("tags.", "params.", "metrics."):
        v = run.get(prefix + name)
        if v not in (None, ""):
            return str(v)
    return ""


def _nfe_key(run: dict) -> str:
    v = num(run_field(run, "nfe"))
    return "" if math.isnan(v) else repr(v)


def select_latest(runs: list[dict]) -> list[dict]:
    """Keep FINISHED runs only, and per (experiment, backbone, solver, nfe) the one that started last.

    Args:
        runs (`list[dict]`): exported rows (``start_time`` as ISO-8601 UTC strings, which sort by time).

    Returns:
        `list[dict]`: the kept rows, sorted by experiment, backbone, solver, NFE, start time and run id.
    """
    best: dict[tuple, dict] = {}
    for r in runs:
        if r.get("status", "FINISHED") != "FINISHED":
            continue
        key = (r.get("experiment", ""), run_field(r, "backbone"), run_field(r, "solver"), _nfe_key(r))
        old = best.get(key)
        if old is None or (r.get("start_time", ""), r["run_id"]) > (old.get("start_time", ""), old["run_id"]):
            best[key] = r
    return sorted(best.values(), key=_sort_key)


def _sort_key(r: dict):
    nfe = num(run_field(r, "nfe"))
    return (r.get("experiment", ""), run_field(r, "backbone"), run_field(r, "solver"),
            math.inf if math.isnan(nfe) else nfe, r.get("start_time", ""), r["run_id"])


def _iso(ms) -> str:
    if ms is None:
        return ""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds")


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    for scheme in ("sqlite:///", "file://"):
        if tracking_uri.startswith(scheme) and not Path(tracking_uri[len(scheme):]).exists():
            raise EPDError(f"tracking URI {tracking_uri}: {tracking_uri[len(scheme):]} does not exist; run the "
                           "pipeline first (its jobs log there) or pass the right --tracking-uri / "
                           "MLFLOW_TRACKING_URI")
    if "://" not in tracking_uri and not Path(tracking_uri).exists():
        raise EPDError(f"tracking URI {tracking_uri}: no such MLflow store directory; pass the right --tracking-uri")
    return MlflowClient(tracking_uri=tracking_uri)


def _search_all(client) -> list[tuple[str, object]]:
    from mlflow.entities import ViewType

    names = {e.experiment_id: e.name for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)}
    out, token = [], None
    while names:
        page = client.search_runs(sorted(names), run_view_type=ViewType.ACTIVE_ONLY, max_results=_PAGE,
                                  page_token=token)
        out.extend((names[r.info.experiment_id], r) for r in page)
        token = page.token
        if not token:
            break
    return out


def _row(experiment: str, run) -> dict:
    i, d = run.info, run.data
    row = {"experiment": experiment, "run_id": i.run_id, "status": i.status,
           "start_time": _iso(i.start_time), "end_time": _iso(i.end_time)}
    row.update({f"tags.{k}": str(v) for k, v in d.tags.items()})
    row.update({f"params.{k}": str(v) for k, v in d.params.items()})
    row.update({f"metrics.{k}": repr(float(v)) for k, v in d.metrics.items()})
    return row


def _csv_text(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="raise", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: r.get(c, "") for c in columns})
    return buf.getvalue()


def export_runs(tracking_uri: str, out_csv: str | Path) -> dict:
    """Export every FINISHED MLflow run (latest per key, see module docstring) to CSV, plus metric histories.

    Args:
        tracking_uri (`str`): MLflow tracking URI (e.g. ``sqlite:///results/mlflow.db``).
        out_csv (`str` or `Path`): runs CSV; the histories go to ``<stem>_history.csv`` beside it. Both are
            written atomically (history first, so a complete runs CSV implies a complete history).

    Returns:
        `dict`: ``runs`` (rows written), ``history_rows``, ``runs_csv``, ``history_csv``.
    """
    client = _client(tracking_uri)
    rows = select_latest([_row(name, run) for name, run in _search_all(client)])
    tag_cols = sorted({k for r in rows for k in r if k.startswith("tags.")})
    par_cols = sorted({k for r in rows for k in r if k.startswith("params.")})
    met_cols = sorted({k for r in rows for k in r if k.startswith("metrics.")})
    history = []
    for r in rows:
        if r["experiment"] not in HISTORY_EXPERIMENTS:
            continue
        for col in (c for c in met_cols if r.get(c, "") != ""):
            key = col[len("metrics."):]
            pts = sorted(client.get_metric_history(r["run_id"], key), key=lambda m: (m.step, m.timestamp))
            history.extend({"run_id": r["run_id"], "key": key, "step": m.step, "value": repr(float(m.value))}
                           for m in pts)
    hist_csv = history_path(out_csv)
    atomic_write_text(hist_csv, _csv_text(history, list(HISTORY_COLUMNS)))
    atomic_write_text(out_csv, _csv_text(rows, [*RUN_COLUMNS, *tag_cols, *par_cols, *met_cols]))
    return {"runs": len(rows), "history_rows": len(history), "runs_csv": Path(out_csv), "history_csv": hist_csv}


def read_runs(runs_csv: str | Path) -> list[dict]:
    """Read an exported runs CSV (all values as strings)."""
    path = Path(runs_csv)
    if not path.is_file():
        raise EPDError(f"runs CSV {path}: not found; export it first (`epd report --export-only "
                       f"--tracking-uri URI --runs-csv {path}`)")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("experiment", "run_id") if c not in (reader.fieldnames or [])]
        if missing:
            raise EPDError(f"runs CSV {path}: missing columns {missing}; it was not written by `epd report`")
        return list(reader)


def read_history(path: str | Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``{run_id: {key: [(step, value), ...]}}`` from a history CSV; empty when the file does not exist."""
    path = Path(path)
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    if not path.is_file():
        return out
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            out.setdefault(r["run_id"], {}).setdefault(r["key"], []).append((int(r["step"]), float(r["value"])))
    return out
