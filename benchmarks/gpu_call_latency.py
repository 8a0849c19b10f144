"""Question 1: per-call denoiser latency versus batch (K stacked points of one image), eager and CUDA-graphed.

For each backbone/resolution and ``k = 1..4`` points (image batch 1; the network sees ``k`` rows, ``2k`` with
classifier-free guidance), time one denoiser call (a) replayed as a CUDA graph (:class:`epd.graphs.CUDAGraphDenoiser`:
two input copies, the replay, one output copy) and (b) eagerly. Medians of CUDA-event timings over repeats, the
queue drained before each repeat, warm-up excluded.

Usage (one GPU)::

    python benchmarks/gpu_call_latency.py --out benchmarks/results/gpu_call_latency.json
    python benchmarks/gpu_call_latency.py --tiny --out /tmp/gpu_call_latency.json   # CPU smoke run

Rows: ``backbone, resolution, gpus (1), gpu, points, network_batch, graph_ms, eager_ms, graph_ratio_vs_1,
eager_ratio_vs_1`` plus versions and dtype.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import (CASES, TINY_CASES, Results, base_row, grid, machine_info, make_case, med, summary,  # noqa: E402
                        time_ms)

from epd.denoiser import repeat_cond  # noqa: E402
from epd.graphs import CUDAGraphDenoiser  # noqa: E402

KS = (1, 2, 3, 4)


def measure_calls(case, machine: dict, results: Results | None, ks=KS, eager: bool = True) -> dict:
    """Time one call per ``k``; returns ``{"graph": {k: ms}, "eager": {k: ms}, "gden": CUDAGraphDenoiser}``.

    A graph capture that fails is recorded in the row and the eager time stands in for it downstream.
    """
    sigmas = grid(case.name, 6, case.device)
    x0 = case.x0(sigmas)
    gden = CUDAGraphDenoiser(case.den, warmup=2)
    out = {"graph": {}, "eager": {}, "gden": gden, "errors": {}}
    for k in ks:
        x = x0.repeat(k, *([1] * (x0.dim() - 1)))
        s = sigmas[1].expand(x.shape[0]).clone()
        cond = repeat_cond(case.cond, k)
        row = base_row(case, machine, gpus=1, points=k, network_batch=k * case.B * case.den.passes_per_eval,
                       graph_ms=None, eager_ms=None)
        if case.device.type == "cuda":
            try:
                t = time_ms(lambda: gden(x, s, cond), case.device, case.warmup, case.reps)
                out["graph"][k] = med(t)
                row.update(graph_ms=med(t), graph=summary(t), graphed=gden.capture_error is None and bool(gden.graphs))
            except Exception as e:  # noqa: BLE001 (record, fall back to eager)
                out["errors"][k] = row["graph_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                gden.enabled = False
        want_eager = eager and (k == 1 or case.res < 1024)  # big models: launch overhead is noise past k=1
        if want_eager or case.device.type != "cuda" or k not in out["graph"]:
            with torch.no_grad():
                t = time_ms(lambda: case.den(x, s, cond), case.device, max(1, case.warmup // 2),
                            max(3, case.reps // 2))
            out["eager"][k] = med(t)
            row.update(eager_ms=med(t), eager=summary(t))
        if k not in out["graph"]:
            out["graph"][k] = out["eager"][k]
        if results is not None:
            results.add(row)
    for r in (results.doc["rows"] if results is not None else []):
        if r["backbone"] == case.name and r["resolution"] == case.res and "points" in r:
            g1, e1 = out["graph"].get(1), out["eager"].get(1)
            r["graph_ratio_vs_1"] = r["graph_ms"] / g1 if r.get("graph_ms") and g1 else None
            r["eager_ratio_vs_1"] = r["eager_ms"] / e1 if r.get("eager_ms") and e1 else None
    if results is not None:
        results.write()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="toy configs on the CPU (smoke test)")
    ap.add_argument("--cases", default=None, help="comma list backbone:resolution")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if not args.tiny and device.type != "cuda":
        ap.error("full-size architectures need a CUDA device; use --tiny on the CPU")
    if args.tiny:
        torch.set_num_threads(1)
    torch.set_grad_enabled(False)  # inference: CUDA graphs apply only without autograd
    cases = TINY_CASES if args.tiny else CASES
    if args.cases:
        cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases.split(",")]
    machine = machine_info(device)
    res = Results(args.out, "gpu_call_latency", machine, tiny=args.tiny)
    for name, r in cases:
        try:
            case = make_case(name, r, device, tiny=args.tiny)
            measure_calls(case, machine, res)
        except Exception as e:  # noqa: BLE001
            res.add({"backbone": name, "resolution": r, "gpu": machine["gpu"], "error": f"{type(e).__name__}: {e}"[:400]})
        finally:
            case = None
            torch.cuda.empty_cache() if device.type == "cuda" else None
    res.write(complete=True)
    for row in res.doc["rows"]:
        print(row.get("backbone"), row.get("resolution"), row.get("points"), row.get("graph_ms"), row.get("eager_ms"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
