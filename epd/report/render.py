"""Writers for one backbone's table: Markdown, LaTeX (booktabs) and CSV (full precision, flags)."""

from __future__ import annotations

import csv
import io
import math

from .tables import PIPELINE, METRIC_LABELS, Row, higher_is_better, is_set_metric

__all__ = ["fmt_value", "fmt_p", "markdown", "latex", "csv_text"]

DASH = "–"


def _decimals(x: float, significant: int) -> int:
    return min(8, max(0, significant - 1 - math.floor(math.log10(abs(x))))) if x else significant


def fmt_value(mean: float, se: float = math.nan) -> str:
    """``mean ± SE`` with SE to 2 significant digits and the mean to the same decimal; ``mean`` alone (4
    significant digits) when there is no SE."""
    if not math.isfinite(mean):
        return DASH
    if math.isfinite(se) and se > 0:
        d = _decimals(se, 2)
        return f"{mean:.{d}f} ± {se:.{d}f}"
    text = f"{mean:.{_decimals(mean, 4)}f}"
    return f"{text} ± 0" if se == 0 else text


def fmt_p(p: float) -> str:
    if not math.isfinite(p):
        return DASH
    return f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}"


def _int(x: float) -> str:
    if not math.isfinite(x):
        return DASH
    return str(int(x)) if x == int(x) else f"{x:g}"


def _seconds(x: float) -> str:
    """Wall clock per image: 3 significant digits."""
    return f"{x:.3g}" if math.isfinite(x) else DASH


def _header(m: str) -> str:
    return f"{METRIC_LABELS.get(m, m)} {'↑' if higher_is_better(m) else '↓'}"


def _show_source(rows: list[Row]) -> bool:
    return any(r.source != PIPELINE for r in rows)


def _paired_items(rows: list[Row], metrics: list[str]):
    for r in rows:
        for m in metrics:
            if m in r.paired:
                yield r, m, r.paired[m]


def markdown(backbone: str, rows: list[Row], metrics: list[str], notes: list[str], within: str) -> str:
    """The Markdown table, the paired-comparison table and footnotes."""
    src = _show_source(rows)
    head = ["Solver", "Steps", "NFE", "Fwd passes", "s/img"] + (["Source"] if src else []) + [_header(m) for m in metrics]
    lines = [f"# {backbone}", "",
             f"Cells: mean ± SE over images (set metrics such as FD/FID: one value, no SE). **Bold**: best in its "
             f"column{' among rows of the same NFE' if within == 'nfe' else ''} (↑ higher is better, ↓ lower is "
             "better). Column definitions: ../README.md.", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * 4 + (["---"] if src else [])
                                                          + ["---:"] * len(metrics)) + "|"]
    for r in rows:
        cells = [r.solver, _int(r.steps), _int(r.nfe), _int(r.forward_passes), _seconds(r.seconds_per_image)] + (
            [r.source] if src else [])
        for m in metrics:
            c = r.cells.get(m)
            text = DASH if c is None else fmt_value(c.mean, c.se) + c.note
            cells.append(f"**{text}**" if m in r.best else text)
        lines.append("| " + " | ".join(cells) + " |")
    paired = list(_paired_items(rows, metrics))
    if paired:
        lines += ["", "## EPD vs the best baseline at the same NFE", "",
                  "Paired by (seed, prompt); Δ = EPD − baseline, two-sided paired t-test.", "",
                  "| Solver | NFE | Metric | Baseline | Δ ± SE | p | n |", "|---|---:|---|---|---:|---:|---:|"]
        for r, m, d in paired:
            delta = fmt_value(d["diff"], d["se"]) if d.get("n") else d.get("note", DASH)
            lines.append(f"| {r.solver} | {_int(r.nfe)} | {METRIC_LABELS.get(m, m)} | {d['vs']} | {delta} | "
                         f"{fmt_p(d['p'])} | {d.get('n') or DASH} |")
    if notes:
        for n in notes:
            lines += ["", n]
    return "\n".join(lines) + "\n"


def _tex(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
                 ("±", r"$\pm$"), ("†", r"$^\dagger$"), ("↑", r"$\uparrow$"), ("↓", r"$\downarrow$"),
                 ("–", "--"), ("−", "$-$"), ("·", r"$\cdot$"), ("Δ", r"$\Delta$"), ("√", r"$\surd$")):
        s = s.replace(a, b)
    return s


def latex(backbone: str, rows: list[Row], metrics: list[str], notes: list[str], within: str) -> str:
    """A booktabs table (``\\usepackage{booktabs}``), NFE groups separated by rules, plus the paired table."""
    src = _show_source(rows)
    head = ["Solver", "Steps", "NFE", "Fwd", "s/img"] + (["Source"] if src else []) + [_header(m) for m in metrics]
    spec = "l" + "r" * 4 + ("l" if src else "") + "c" * len(metrics)
    out = [f"% epd report: {backbone} (generated; do not edit). Requires \\usepackage{{booktabs}}.",
           r"\begin{table}[t]", r"\centering", r"\small",
           rf"\caption{{{_tex(backbone)}: mean $\pm$ SE over images; bold: best "
           rf"{'at each NFE' if within == 'nfe' else 'per column'}.}}",
           rf"\label{{tab:{backbone}}}", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
           " & ".join(_tex(h) for h in head) + r" \\", r"\midrule"]
    prev = None
    for r in rows:
        if prev is not None and r.group != prev:
            out.append(r"\midrule")
        prev = r.group
        cells = [_tex(r.solver), _int(r.steps).replace(DASH, "--"), _int(r.nfe).replace(DASH, "--"),
                 _int(r.forward_passes).replace(DASH, "--"), _seconds(r.seconds_per_image).replace(DASH, "--")] + (
                     [_tex(r.source)] if src else [])
        for m in metrics:
            c = r.cells.get(m)
            text = "--" if c is None else _tex(fmt_value(c.mean, c.se) + c.note)
            cells.append(rf"\textbf{{{text}}}" if m in r.best else text)
        out.append(" & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    paired = [(r, m, d) for r, m, d in _paired_items(rows, metrics) if d.get("n")]
    if paired:
        out += [r"\par\medskip", r"\begin{tabular}{lrllrrr}", r"\toprule",
                r"Solver & NFE & Metric & Baseline & $\Delta \pm$ SE & $p$ & $n$ \\", r"\midrule"]
        out += [" & ".join([_tex(r.solver), _int(r.nfe), _tex(METRIC_LABELS.get(m, m)), _tex(d["vs"]),
                            _tex(fmt_value(d["diff"], d["se"])), _tex(fmt_p(d["p"])), str(d["n"])]) + r" \\"
                for r, m, d in paired]
        out += [r"\bottomrule", r"\end{tabular}"]
    if notes:
        out += [r"\par\footnotesize"] + [_tex(n) + r"\\" for n in notes]
    out.append(r"\end{table}")
    return "\n".join(out) + "\n"


def csv_text(backbone: str, rows: list[Row], metrics: list[str]) -> str:
    """Full-precision CSV: per metric ``_mean, _se, _n, _best`` and, for EPD rows, ``_vs, _diff, _diff_se, _p``."""
    cols = ["backbone", "solver", "steps", "nfe", "nfe_sequential", "forward_passes", "seconds_per_image",
            "cost_batch", "machine", "source", "run_id"]
    for m in metrics:
        cols += [f"{m}_mean", f"{m}_se", f"{m}_n", f"{m}_best"]
        if not is_set_metric(m):
            cols += [f"{m}_vs", f"{m}_diff", f"{m}_diff_se", f"{m}_p", f"{m}_pairs"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    f = lambda x: "" if x is None or (isinstance(x, float) and math.isnan(x)) else repr(x)  # noqa: E731
    for r in rows:
        rec = {"backbone": backbone, "solver": r.solver, "steps": f(r.steps), "nfe": f(r.nfe),
               "nfe_sequential": f(r.nfe_sequential), "forward_passes": f(r.forward_passes),
               "seconds_per_image": f(r.seconds_per_image), "cost_batch": f(r.cost_batch), "machine": r.machine,
               "source": r.source, "run_id": r.run_id}
        for m in metrics:
            c = r.cells.get(m)
            if c is not None:
                rec.update({f"{m}_mean": f(c.mean), f"{m}_se": f(c.se), f"{m}_n": f(c.n),
                            f"{m}_best": int(m in r.best)})
            d = r.paired.get(m)
            if d is not None:
                rec.update({f"{m}_vs": d["vs"], f"{m}_diff": f(d["diff"]), f"{m}_diff_se": f(d["se"]),
                            f"{m}_p": f(d["p"]), f"{m}_pairs": d.get("n") or ""})
        w.writerow(rec)
    return buf.getvalue()
