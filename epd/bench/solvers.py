"""``epd bench solvers``: every baseline and the distilled EPD table on the embedded backbone, NFE 3/5/7/9.

For each row: digits-FD against the held-out real digits (equal sample counts for every row), conditional
accuracy, and final-state RMSE against a high-NFE teacher solve from the same noise. NFE is counted the paper's
way (an EPD step = 2 sequential evaluations, AFS saves one) with forward passes beside it; an equal-compute
comparison (EPD against baselines at the same forward passes) is reported too.

The learned peers of the config's ``peers.solvers`` (AMED-Solver/-Plugin, LD3, GITS; :mod:`epd.bench.peers`) add
their rows after every other row (so those rows' numbers do not move), and ``compute_matched`` pairs each EPD row
with the best row (baseline or peer) at no more forward passes: the paired RMSE difference over the evaluation
seeds and its SE; ``best_at_nfe`` names the best row at each NFE and its margin over the runner-up in SE.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from ..io import atomic_write_json
from ..solvers import steps_for_nfe
from ..report.compute_matched import best_by_nfe, compute_matched
from .peers import peer_labels, peer_run
from .study import distilled_table, ensure_backbone, eval_set, load_study, machine, run_solver

BASELINES = ("euler", "heun", "dpm2", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "ipndm_v")


def bench_solvers(config: str, workdir: Path, weights: str | None = None, nfes=(3, 5, 7, 9),
                  n_eval: int = 1000) -> dict:
    from ..rewards import get_scorer

    cfg, sec = load_study(config)
    t0 = time.time()
    bb, wdir, train_min = ensure_backbone(config, sec, workdir, weights)
    fd = get_scorer("digits_fd", weights_dir=str(wdir))
    acc = get_scorer("digits_accuracy", weights_dir=str(wdir))
    from ..backbones.digits import load_split

    split_meta = (bb.meta.get("data") or {}) if hasattr(bb, "meta") else {}
    split = load_split(seed=int(split_meta.get("seed", 0)), upsample=int(split_meta.get("upsample", 1)))
    real = ((split.x_heldout + 1) / 2).clamp(0, 1).repeat(1, 3, 1, 1)
    seeds, prompts = eval_set(sec, n_eval)
    bench = sec.get("bench") or {}
    tea_solver, tea_steps = bench.get("teacher_solver", "heun"), int(bench.get("teacher_steps", 100))
    tea_sig = bb.sigmas(tea_steps + 1)
    x_tea, img_tea, out_tea = run_solver(bb, tea_solver, seeds, prompts, tea_sig)

    per_seed = {}  # (solver, nfe) -> per-seed RMSE vs teacher: the compute-matched view's paired differences

    def measure(x, imgs):
        err = ((x - x_tea) ** 2).flatten(1).mean(1).sqrt()
        per_seed[len(per_seed)] = err
        return {"rmse_vs_teacher": float(err.mean()),
                "fd": float(fd.compute(imgs, real)), "accuracy": float(acc(imgs, prompts).mean())}

    teacher = {"solver": tea_solver, "steps": tea_steps, "nfe": out_tea.nfe, "forward_passes": out_tea.forward_passes,
               "fd": float(fd.compute(img_tea, real)), "accuracy": float(acc(img_tea, prompts).mean())}
    rows = []
    for nfe in nfes:
        for name in BASELINES:
            try:
                sig = bb.sigmas(steps_for_nfe(name, nfe))
            except Exception:  # noqa: BLE001 - odd NFE for a two-evaluation solver: not defined
                continue
            x, imgs, out = run_solver(bb, name, seeds, prompts, sig)
            rows.append({"solver": name, "nfe": out.paper_nfe, "steps": len(sig) - 1,
                         "forward_passes": out.forward_passes, **measure(x, imgs)})
        table, spec = distilled_table(bb, sec, nfe, workdir, wdir)
        x, imgs, out = run_solver(bb, "epd", seeds, prompts, bb.sigmas(table.num_steps, spec.schedule), table=table)
        rows.append({"solver": "epd_distilled", "nfe": out.paper_nfe, "steps": table.num_steps - 1,
                     "forward_passes": out.forward_passes, "K": table.num_points, "afs": spec.afs,
                     **measure(x, imgs)})
    summary = _summarise(rows)
    peers = peer_labels(sec)
    for nfe in nfes:  # after every existing row, so those rows' numbers do not move
        for label in peers:
            solver, sig, table, extra = peer_run(bb, sec, nfe, label, workdir, wdir)
            x, imgs, out = run_solver(bb, solver, seeds, prompts, sig, table=table)
            rows.append({"solver": label, "nfe": out.paper_nfe, "steps": len(sig) - 1,
                         "forward_passes": out.forward_passes, **extra, **measure(x, imgs)})
    summary.update(_compute_matched(rows, per_seed, seeds))
    return {"benchmark": "solvers", "backbone": "digits", "config": config, "guidance": sec.get("guidance"),
            "n_eval": n_eval, "eval_seeds": f"{seeds[0]}-{seeds[-1]}", "real_reference": f"{len(real)} held-out digits",
            "train_minutes": round(train_min, 2), "teacher": teacher, "rows": rows, **summary,
            "machine": machine(), "seconds": round(time.time() - t0, 1)}


def _compute_matched(rows: list[dict], per_seed: dict, seeds: list[int]) -> dict:
    """Each EPD row against the best row (baseline or peer) at no more forward passes, and the best row at each
    NFE against its runner-up: paired RMSE differences over the evaluation seeds, in SE."""
    items = [{"solver": r["solver"], "nfe": r["nfe"], "forward_passes": r["forward_passes"],
              "mean": r["rmse_vs_teacher"], "values": dict(zip(seeds, per_seed[i].tolist()))}
             for i, r in enumerate(rows)]
    return {"compute_matched": compute_matched(items, "rmse_vs_teacher"),
            "best_at_nfe": best_by_nfe(items, "rmse_vs_teacher")}


def _summarise(rows: list[dict]) -> dict:
    """EPD against the baselines (the learned peers are compared in :func:`_compute_matched`)."""
    out = {}
    for nfe in sorted({r["nfe"] for r in rows}):
        epd = [r for r in rows if r["nfe"] == nfe and r["solver"].startswith("epd")]
        base = [r for r in rows if r["nfe"] == nfe and not r["solver"].startswith("epd")]
        if not epd or not base:
            continue
        best = min(base, key=lambda r: r["rmse_vs_teacher"])
        e = epd[0]
        eq = [r for r in rows if not r["solver"].startswith("epd") and r["forward_passes"] <= e["forward_passes"]]
        best_eq = min(eq, key=lambda r: r["rmse_vs_teacher"]) if eq else None
        out[f"nfe{nfe}"] = {
            "epd_rmse": e["rmse_vs_teacher"], "best_baseline": best["solver"],
            "best_baseline_rmse": best["rmse_vs_teacher"],
            "epd_over_best_baseline_rmse": e["rmse_vs_teacher"] / best["rmse_vs_teacher"],
            "equal_forward_passes": None if best_eq is None else {
                "epd_forward_passes": e["forward_passes"], "best_baseline": best_eq["solver"],
                "baseline_nfe": best_eq["nfe"], "baseline_forward_passes": best_eq["forward_passes"],
                "baseline_rmse": best_eq["rmse_vs_teacher"],
                "epd_over_baseline_rmse": e["rmse_vs_teacher"] / best_eq["rmse_vs_teacher"]}}
    return {"comparisons": out}


def add_arguments(p):
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--weights", default=None, help="trained backbone folder (skip training)")
    p.add_argument("--workdir", default=None, help="keep intermediate files here (default: a temp dir)")
    p.add_argument("--n-eval", type=int, default=1000)


def run(args):
    with tempfile.TemporaryDirectory() as tmp:
        wd = Path(args.workdir or tmp)
        wd.mkdir(parents=True, exist_ok=True)
        rec = bench_solvers(args.config, wd, args.weights, n_eval=args.n_eval)
    atomic_write_json(args.out, rec)
    print(f"{'solver':<16}{'nfe':>4}{'fwd':>5}{'rmse':>9}{'fd':>8}{'acc':>7}")
    for r in rec["rows"]:
        print(f"{r['solver']:<16}{r['nfe']:>4}{r['forward_passes']:>5}{r['rmse_vs_teacher']:>9.4f}{r['fd']:>8.3f}"
              f"{r['accuracy']:>7.3f}")
    t = rec["teacher"]
    print(f"teacher {t['solver']} {t['steps']} steps: fd {t['fd']:.3f} acc {t['accuracy']:.3f}")
    for k, v in rec["comparisons"].items():
        print(f"{k}: EPD/best baseline ({v['best_baseline']}) RMSE = {v['epd_over_best_baseline_rmse']:.3f}")
    for v in rec["compute_matched"]:
        print(f"{v['solver']} NFE {v['nfe']} ({v['forward_passes']} fwd) vs {v['vs']} NFE {v['vs_nfe']} "
              f"({v['vs_forward_passes']} fwd): RMSE diff {v['diff']:+.4f} +- {v['se']:.4f}")
    for v in rec["best_at_nfe"]:
        print(f"NFE {v['nfe']}: best {v['solver']} over {v['vs']} by {v['advantage_in_se']:.1f} SE")
    _ = torch
    return 0
