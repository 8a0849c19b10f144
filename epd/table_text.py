"""The text summary of an EPD table that ``epd predictor show`` prints, from plain arrays (imports no torch).

:meth:`epd.table.EPDTable.summary` and the torch-free ``predictor show`` (:func:`epd.predictor.describe`) both
format through :func:`summary_text`, so the two never disagree.
"""

from __future__ import annotations

import json

__all__ = ["summary_text", "guidance_text"]


def guidance_text(kind, rate) -> str:
    """``cfg (scale 7.5)``; ``none`` for an unguided table (no type and a rate of None, 0 or 1)."""
    if kind is None:
        return "none" if rate in (None, 0, 0.0, 1, 1.0) else f"scale {rate} (type not recorded)"
    return f"{kind} (scale {rate})" if rate is not None else f"{kind} (scale not recorded)"


def _row(values) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def summary_text(meta: dict, provenance: dict, arrays: dict) -> str:
    """Header lines (N, K, backbone, guidance, schedule, sigma range, scales), one line per step and the full
    provenance as indented JSON.

    Args:
        meta (`dict`): the table's metadata.
        provenance (`dict`): where it came from (printed whole).
        arrays (`dict`): ``positions`` and ``weights`` ``(N-1, K)``, optional ``scale_dir``/``scale_time``: anything
            with ``.tolist()`` (numpy arrays or torch tensors).
    """
    m = meta
    rows = {k: v.tolist() for k, v in arrays.items() if v is not None}
    n_rows, k = len(rows["positions"]), len(rows["positions"][0])
    lines = [f"EPD table: N={n_rows + 1} grid points ({n_rows} steps), K={k}",
             f"  backbone={m.get('backbone')} resolution={m.get('img_resolution')} "
             f"guidance={guidance_text(m.get('guidance_type'), m.get('guidance_rate'))} "
             f"schedule={m.get('schedule_type')} rho={m.get('schedule_rho')} afs={m.get('afs')} coords={m.get('coords')}",
             f"  sigma_min={m.get('sigma_min')} sigma_max={m.get('sigma_max')} "
             f"mu={m.get('flowmatch_mu')} shift={m.get('flowmatch_shift')}",
             f"  scales: dir={'on' if 'scale_dir' in rows else 'off'} time={'on' if 'scale_time' in rows else 'off'}"]
    for n in range(n_rows):
        extra = "".join(f" {c}={_row(rows[name][n])}" for name, c in (("scale_dir", "c"), ("scale_time", "a"))
                        if name in rows)
        lines.append(f"  step {n}: r={_row(rows['positions'][n])} w={_row(rows['weights'][n])}{extra}")
    if provenance:
        lines.append("  provenance:")
        lines += ["    " + ln for ln in json.dumps(provenance, indent=2, default=str).splitlines()]
    return "\n".join(lines)
