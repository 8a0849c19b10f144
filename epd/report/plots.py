"""PNG plots of one backbone: metrics vs NFE, RDPO curves, Stage-1 loss, learned EPD tables.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot state, no display needed) and written
atomically. Each function returns whether it wrote a file (False when there is nothing to plot).
"""

from __future__ import annotations

import math
from pathlib import Path

from ..io import atomic_path
from .tables import PIPELINE, METRIC_LABELS, Row, higher_is_better

__all__ = ["metric_vs_nfe", "rdpo_curves", "distill_loss", "epd_tables"]

History = dict[str, list[tuple[int, float]]]


def _figure(nrows: int, ncols: int, size=(4.2, 3.2)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _integer_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _save(fig, path: Path) -> bool:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
    return True


def metric_vs_nfe(rows: list[Row], metrics: list[str], path: Path, title: str = "") -> bool:
    """One panel per metric, one line per solver over NFE; error bars are the SE (none for set metrics)."""
    rows = [r for r in rows if r.source == PIPELINE and math.isfinite(r.nfe)]
    metrics = [m for m in metrics if any(m in r.cells for r in rows)]
    if not rows or not metrics:
        return False
    ncols = min(3, len(metrics))
    fig, axes = _figure(math.ceil(len(metrics) / ncols), ncols)
    solvers = list(dict.fromkeys(r.solver for r in rows))
    for ax, m in zip(axes.flat, metrics):
        for i, s in enumerate(solvers):
            pts = sorted((r.nfe, r.cells[m].mean, r.cells[m].se) for r in rows if r.solver == s and m in r.cells)
            if not pts:
                continue
            x, y, e = zip(*pts)
            err = [v if math.isfinite(v) else 0.0 for v in e]
            ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=3, lw=1.4 if s.startswith("epd") else 1.0,
                        color=f"C{i % 10}", label=s)
        ax.set_title(f"{METRIC_LABELS.get(m, m)} ({'higher' if higher_is_better(m) else 'lower'} is better)")
        ax.set_xlabel("NFE")
        ax.xaxis.set_major_locator(_integer_ticks())
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _label(run: dict) -> str:
    nfe = run.get("nfe")
    return f"NFE {nfe:g}" if isinstance(nfe, float) and math.isfinite(nfe) else run["run_id"][:8]


def rdpo_curves(runs: list[dict], history: dict[str, History], path: Path, title: str = "") -> bool:
    """Left: batch reward mean (± batch std band) and held-out eval reward points; right: KL to the start."""
    runs = [r for r in runs if "mixed_reward_mean" in history.get(r["run_id"], {})]
    if not runs:
        return False
    fig, axes = _figure(1, 2)
    ax_r, ax_kl = axes[0]
    for i, run in enumerate(runs):
        h, color = history[run["run_id"]], f"C{i}"
        steps, mean = zip(*h["mixed_reward_mean"])
        ax_r.plot(steps, mean, color=color, lw=1.0, label=f"{_label(run)} batch mean")
        if "mixed_reward_std" in h and len(h["mixed_reward_std"]) == len(mean):
            std = [v for _, v in h["mixed_reward_std"]]
            ax_r.fill_between(steps, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                              color=color, alpha=0.12, lw=0)
        if h.get("eval_reward"):
            es, ev = zip(*h["eval_reward"])
            ax_r.plot(es, ev, "D", color=color, ms=5, mec="k", label=f"{_label(run)} held-out eval")
        if h.get("kl"):
            ks, kv = zip(*h["kl"])
            ax_kl.plot(ks, kv, color=color, label=_label(run))
    ax_r.set(xlabel="RDPO step", ylabel="reward", title="reward")
    ax_kl.set(xlabel="RDPO step", ylabel="KL", title="KL to the initial policy")
    for ax in (ax_r, ax_kl):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def distill_loss(runs: list[dict], history: dict[str, History], path: Path, title: str = "") -> bool:
    """Stage-1 loss per iteration, one line per NFE (log scale when all values are positive)."""
    runs = [r for r in runs if history.get(r["run_id"], {}).get("loss")]
    if not runs:
        return False
    fig, axes = _figure(1, 1, size=(5.5, 3.6))
    ax = axes[0, 0]
    positive = True
    for run in runs:
        steps, loss = zip(*history[run["run_id"]]["loss"])
        positive &= min(loss) > 0
        ax.plot(steps, loss, label=_label(run))
    if positive:
        ax.set_yscale("log")
    ax.set(xlabel="iteration", ylabel="loss", title=title or "Stage-1 distillation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def epd_tables(tables: list[tuple[float, dict]], path: Path, title: str = "") -> bool:
    """Per NFE (one row of panels): learned positions ``r_k`` and weights ``w_k`` per step, for each table kind.

    Args:
        tables: ``[(nfe, {"distilled": EPDTable, "rdpo": EPDTable}), ...]``; either kind may be absent.
    """
    tables = [(nfe, t) for nfe, t in tables if t]
    if not tables:
        return False
    fig, axes = _figure(len(tables), 2)
    styles = {"distilled": dict(ls="-", marker="o"), "rdpo": dict(ls="--", marker="x")}
    for (nfe, kinds), (ax_p, ax_w) in zip(tables, axes):
        for kind, table in kinds.items():
            steps = list(range(table.positions.shape[0]))
            for k in range(table.num_points):
                st = dict(styles.get(kind, {}), color=f"C{k}", ms=4, lw=1.0)
                ax_p.plot(steps, table.positions[:, k].tolist(), label=f"{kind} k={k + 1}", **st)
                ax_w.plot(steps, table.weights[:, k].tolist(), label=f"{kind} k={k + 1}", **st)
        tag = f"NFE {nfe:g}" if math.isfinite(nfe) else "NFE ?"
        ax_p.set(xlabel="step n", ylabel="position r_k", title=f"{tag}: intermediate positions", ylim=(0, 1))
        ax_w.set(xlabel="step n", ylabel="weight w_k", title=f"{tag}: simplex weights", ylim=(0, 1))
        for ax in (ax_p, ax_w):
            ax.xaxis.set_major_locator(_integer_ticks())
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
