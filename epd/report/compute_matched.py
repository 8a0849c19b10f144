"""The compute-matched view: each EPD row beside the best other row that spends no more forward passes.

EPD counts its K parallel points as one sequential evaluation (the paper's NFE); a forward-pass budget counts them
all. For every EPD row and metric this view picks, among the non-EPD rows (baselines and learned peers: AMED, LD3,
GITS) at no more forward passes, the one with the best mean, and reports the paired difference ``EPD - other`` over
the same samples (seeds and prompts) with its standard error. It also names the best row at each paper NFE and its
margin over the runner-up, in SE.

Items are plain dicts, so the benchmark (per-seed errors in memory) and the report (per-image score files) share
the code: ``{"solver", "nfe", "forward_passes", "mean", "values"}`` with ``values`` a ``{sample key: value}`` map
(None for set metrics such as FD, which get no SE).
"""

from __future__ import annotations

import math

from ..metrics.stats import paired_diff

__all__ = ["compute_matched", "best_by_nfe", "markdown", "items_from_rows"]


def _is_epd(item: dict) -> bool:
    return str(item["solver"]).startswith("epd")


def _paired(a: dict, b: dict) -> dict:
    """Paired ``a - b`` over shared sample keys (``diff`` only, SE NaN, without per-sample values)."""
    va, vb = a.get("values"), b.get("values")
    if not va or not vb:
        return {"diff": a["mean"] - b["mean"], "se": math.nan, "n": 0}
    keys = sorted(set(va) & set(vb))
    if len(keys) < 2:
        return {"diff": a["mean"] - b["mean"], "se": math.nan, "n": len(keys)}
    res = paired_diff([va[k] for k in keys], [vb[k] for k in keys])
    return {"diff": res["diff"], "se": res["se"], "n": res["n"]}


def _best(items: list[dict], lower_is_better: bool) -> dict:
    return min(items, key=lambda r: r["mean"] if lower_is_better else -r["mean"])


def _record(a: dict, b: dict, metric: str, lower_is_better: bool) -> dict:
    p = _paired(a, b)
    gain = -p["diff"] if lower_is_better else p["diff"]  # > 0: ``a`` is better
    return {"metric": metric, "solver": a["solver"], "nfe": a["nfe"], "forward_passes": a["forward_passes"],
            "mean": a["mean"], "vs": b["solver"], "vs_nfe": b["nfe"], "vs_forward_passes": b["forward_passes"],
            "vs_mean": b["mean"], "diff": p["diff"], "se": p["se"], "n": p["n"],
            "advantage_in_se": gain / p["se"] if p["se"] and math.isfinite(p["se"]) and p["se"] > 0 else math.nan}


def compute_matched(items: list[dict], metric: str, lower_is_better: bool = True) -> list[dict]:
    """For each EPD item: the best non-EPD item at no more forward passes, and the paired difference.

    Returns one record per EPD item with a candidate: ``solver, nfe, forward_passes, mean`` (EPD), ``vs, vs_nfe,
    vs_forward_passes, vs_mean`` (the other row), ``diff`` (EPD - other), ``se``, ``n`` and ``advantage_in_se``
    (EPD's advantage in SE: positive when EPD is better).
    """
    out = []
    for e in sorted((i for i in items if _is_epd(i)), key=lambda i: (i["nfe"], i["solver"])):
        cands = [i for i in items if not _is_epd(i) and i["forward_passes"] <= e["forward_passes"]]
        if cands:
            out.append(_record(e, _best(cands, lower_is_better), metric, lower_is_better))
    return out


def best_by_nfe(items: list[dict], metric: str, lower_is_better: bool = True) -> list[dict]:
    """At each paper NFE, the best row and its paired margin over the runner-up (``advantage_in_se`` > 0)."""
    out = []
    for nfe in sorted({i["nfe"] for i in items}):
        at = [i for i in items if i["nfe"] == nfe]
        if len(at) < 2:
            continue
        win = _best(at, lower_is_better)
        out.append(_record(win, _best([i for i in at if i is not win], lower_is_better), metric, lower_is_better))
    return out


def _fmt(x: float, digits: int = 4) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def markdown(records: list[dict], title: str = "Compute-matched: EPD vs the best row at no more forward passes") -> str:
    """A Markdown table of :func:`compute_matched` records."""
    lines = [f"### {title}", "", "| metric | EPD row | NFE | fwd | EPD | best other (NFE, fwd) | other | "
             "EPD - other | SE | EPD advantage (SE) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['metric']} | {r['solver']} | {r['nfe']} | {r['forward_passes']} | {_fmt(r['mean'])} | "
                     f"{r['vs']} ({r['vs_nfe']}, {r['vs_forward_passes']}) | {_fmt(r['vs_mean'])} | "
                     f"{_fmt(r['diff'], 3)} | {_fmt(r['se'], 2)} | {_fmt(r['advantage_in_se'], 3)} |")
    return "\n".join(lines) + "\n"


def items_from_rows(rows, metric: str, scores) -> list[dict]:
    """Items of the report's :class:`~epd.report.tables.Row` objects for one metric (per-image values read through
    the report's score cache; pipeline rows with a forward-pass count only)."""
    out = []
    for r in rows:
        if metric not in r.cells or math.isnan(r.forward_passes) or math.isnan(r.nfe):
            continue
        values = scores.column(r.scores_csv, metric) if r.scores_csv else None
        out.append({"solver": r.solver, "nfe": int(r.nfe), "forward_passes": int(r.forward_passes),
                    "mean": r.cells[metric].mean, "values": values})
    return out


def report_view(rows, metrics: list[str], scores, higher_is_better) -> str:
    """The view for one backbone's report: every metric of the table (paired where per-image scores exist), as
    Markdown; empty when no EPD row has a candidate at its forward-pass budget."""
    parts = []
    for m in metrics:
        recs = compute_matched(items_from_rows(rows, m, scores), m, lower_is_better=not higher_is_better(m))
        if recs:
            parts.append(markdown(recs, f"{m}: EPD vs the best row at no more forward passes"))
    return "\n".join(parts)
