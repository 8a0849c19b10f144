"""Questions 2 and 4: per-step latency of an EPD step (K = 1..4) against single-evaluation steps, on one GPU and
with the K points spread over G GPUs; solver overhead (step time minus denoiser time); the numerical identity
of point-parallel sampling; a labelled one-GPU simulation of K = 4 on four GPUs.

Steps are timed on the fastest path we have on both sides of every ratio: each coarse step is replayed as CUDA
graph(s) (:class:`epd.graphs.GraphedEPDSampler` / :class:`~epd.graphs.GraphedEulerSampler`; with G GPUs two graphs
around the NCCL all-gather). For comparison the unfused path (``epd.solvers.solve`` on a
:class:`~epd.graphs.CUDAGraphDenoiser`, i.e. what ``epd sample`` runs, with its per-call NaN check) is timed too.
One step (grid index 1, with a probe call) is timed from the same start state each repeat; medians of CUDA
events, warm-up excluded, the queue drained (and with G GPUs the ranks barriered) before each repeat.

Ratios (all from the same card):

* ``epd_k2_step_ratio`` = EPD step with K = 2 / EPD step with K = 1. Both have two sequential evaluation stages
  (probe, then the points); K = 1 is the single-evaluation-per-stage step (the structure of DPM-Solver-2), so
  the ratio is the price of the extra point. ``epd_k2_vs_euler_ratio`` divides by a one-stage Euler step instead.
* ``solver_overhead_fraction`` = (step time - denoiser time) / denoiser time, denoiser time being the graphed
  calls the step makes (probe + points on one GPU; probe + own share with G GPUs, so it includes the gather).

Usage::

    python benchmarks/gpu_epd_step.py --out-dir benchmarks/results --gpus 2      # one process per GPU (NCCL)
    python benchmarks/gpu_epd_step.py --out-dir /tmp/epd_step --tiny --gpus 2    # CPU smoke run (gloo)
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_call_latency import measure_calls  # noqa: E402
from gpu_common import (CASES, FULL, TINY, TINY_CASES, Results, base_row, build_model, grid, machine_info,  # noqa: E402
                        make_case, med, time_ms)

from epd.graphs import CUDAGraphDenoiser, GraphedEPDSampler, GraphedEulerSampler, StaticGraph  # noqa: E402
from epd.parallel import PointParallelDenoiser, init_point_parallel  # noqa: E402
from epd.table import uniform_table  # noqa: E402
from epd.solvers import solve  # noqa: E402

KS = (1, 2, 3, 4)
STEP = 1  # grid index of the timed step (has a probe call)
N_POINTS = 6


def _marks_cb(device, marks: list):
    def cb(_info=None):
        if device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            marks.append(ev)
        else:
            marks.append(time.perf_counter())
    return cb


def solve_path_steps(den, case, x0, K: int | None, reps: int, barrier=None) -> list[float]:
    """Per-step ms of ``epd.solvers.solve`` (``K`` None: Euler) over a CPU grid, from callback events (steps 1..)."""
    sig_cpu = grid(case.name, N_POINTS, "cpu")
    table = uniform_table(N_POINTS, K) if K else None
    out = []
    for r in range(reps + 1):
        marks: list = []
        if case.device.type == "cuda":
            torch.cuda.synchronize(case.device)
        if barrier:
            barrier()
        solve("epd" if K else "euler", den, x0, sig_cpu, cond=case.cond, table=table,
              callback=_marks_cb(case.device, marks))
        if case.device.type == "cuda":
            torch.cuda.synchronize(case.device)
            ints = [a.elapsed_time(b) for a, b in zip(marks[:-1], marks[1:])]
        else:
            ints = [(b - a) * 1e3 for a, b in zip(marks[:-1], marks[1:])]
        if r:
            out += ints
    return out


def fused_step_ms(sampler, case, x0, sigmas, warmup, reps, barrier=None) -> list[float]:
    sampler.prepare(x0, sigmas, case.cond)
    return time_ms(lambda: sampler.step(STEP), case.device, warmup, reps, pre=lambda: sampler.load_state(x0),
                   barrier=barrier)


def one_gpu_steps(case, machine, calls: dict, results: Results | None, ks=KS, solve_ks=(1, 2),
                  solve_path: bool = True) -> dict:
    """Fused Euler and EPD K steps on one device, plus the unfused ``solve`` path; returns the medians."""
    sigmas = grid(case.name, N_POINTS, case.device)
    x0 = case.x0(sigmas)
    c = calls["graph"]
    errors = {}
    eul = GraphedEulerSampler(case.den, check_finite=False)
    t = {"euler": med(fused_step_ms(eul, case, x0, sigmas, case.warmup, case.reps))}
    graphed = {"euler": bool(eul.graphs) and not eul.capture_error}
    if eul.capture_error:
        errors["euler"] = eul.capture_error
    for K in ks:
        smp = GraphedEPDSampler(case.den, uniform_table(N_POINTS, K), afs=False, check_finite=False)
        t[K] = med(fused_step_ms(smp, case, x0, sigmas, case.warmup, case.reps))
        graphed[K] = bool(smp.graphs) and not smp.capture_error
        if smp.capture_error:
            errors[K] = smp.capture_error
        del smp
    sreps = max(1, case.reps // 4)
    sol, sovh = {}, {}
    if solve_path:
        sol = {"euler": med(solve_path_steps(calls["gden"], case, x0, None, sreps))}
        for K in solve_ks:
            sol[K] = med(solve_path_steps(calls["gden"], case, x0, K, sreps))
        sovh = {"euler": (sol["euler"] - c[1]) / c[1], **{K: (sol[K] - c[1] - c[K]) / (c[1] + c[K]) for K in solve_ks}}
    ovh = {"euler": (t["euler"] - c[1]) / c[1], **{K: (t[K] - c[1] - c[K]) / (c[1] + c[K]) for K in ks}}
    if results is not None:
        for K in ks:
            results.add(base_row(case, machine, row_type="step", gpus=1, K=K, path="fused_graph", step_ms=t[K],
                                 step_ratio=t[K] / t[1], single_eval_step_ms=t[1], euler_step_ms=t["euler"],
                                 step_vs_euler=t[K] / t["euler"], denoiser_ms=c[1] + c[K],
                                 solver_overhead_fraction=ovh[K],
                                 solve_path_step_ms=sol.get(K), solve_path_overhead_fraction=sovh.get(K),
                                 graphed=graphed[K], graph_error=errors.get(K)))
    return {"fused": t, "solve": sol, "overhead": ovh, "solve_overhead": sovh, "x0": x0, "sigmas": sigmas,
            "graph_errors": {str(k): v for k, v in errors.items()}, "graphed": graphed}


def two_gpu_steps(case, machine, group, ctrl, results: Results | None, ks=KS, solve_ks=(2,), gden=None,
                  check_ks=KS) -> dict:
    """Point-parallel fused steps (K over the ranks, K = 3 padded) and the unfused solve path for ``solve_ks``."""
    sigmas = grid(case.name, N_POINTS, case.device)
    x0 = case.x0(sigmas)
    barrier = (lambda: dist.barrier(group=ctrl)) if ctrl is not None else None
    t, sol, same, errors, graphed = {}, {}, {}, {}, {}
    for K in ks:
        ppd = PointParallelDenoiser(case.den, group, batch=case.B, uneven="pad")
        smp = GraphedEPDSampler(ppd, uniform_table(N_POINTS, K), afs=False, check_finite=False)
        t[K] = med(fused_step_ms(smp, case, x0, sigmas, case.warmup, case.reps, barrier=barrier))
        graphed[K] = bool(smp.graphs) and not smp.capture_error
        if smp.capture_error:
            errors[K] = smp.capture_error
        if K not in check_ks:
            del smp, ppd
            continue
        # a whole run from the start: every rank must hold the same final state
        smp.prepare(x0, sigmas, case.cond)
        for n in range(N_POINTS - 1):
            smp.step(n)
        xs = [torch.empty_like(smp.result()) for _ in range(dist.get_world_size(group))]
        dist.all_gather(xs, smp.result().contiguous(), group=group)
        same[K] = all(torch.equal(xs[0], v) for v in xs[1:])
        del smp, ppd
    sreps = max(1, case.reps // 4)
    gden = gden or CUDAGraphDenoiser(case.den)
    for K in solve_ks:
        sol[K] = med(solve_path_steps(PointParallelDenoiser(gden, group, batch=case.B), case, x0, K,
                                      sreps, barrier=barrier))
    return {"fused": t, "solve": sol, "ranks_identical": same, "graph_errors": {str(k): v for k, v in errors.items()},
            "graphed": graphed}


def simulate_four_gpus(case, calls: dict, one: dict, two: dict | None, streams: bool = True) -> dict:
    """One-GPU estimates of a K = 4 step on four GPUs (a simulation, not a measurement on four GPUs).

    * ``model``: probe + the slowest of the 4 single-point evaluations (each its own graph, timed alone) + the
      one-GPU step's non-denoiser time + the all-gather cost seen on two GPUs (K=2 on 2 GPUs minus K=1 on 1).
    * ``streams``: the probe, then the 4 single-point graphs replayed on 4 concurrent CUDA streams of this one
      GPU (they share its SMs, so this is an upper bound, near the batched cost, not a 4-GPU estimate).
    """
    c = calls["graph"]
    x0, sigmas = one["x0"], one["sigmas"]
    arith = one["fused"][1] - 2 * c[1]  # the one-GPU K=1 step minus its two evaluations
    gather = max(0.0, two["fused"][2] - one["fused"][1]) if two else 0.0
    if not streams:  # the 4 single-point evaluations have the shape (and cost) of the measured one-point call
        return {"singles_ms": [c[1]] * 4, "streams_ms": None, "model_ms": 2 * c[1] + arith + gather,
                "gather_ms": gather, "arith_ms": arith}
    s_pts = [sigmas[STEP] * (0.8 ** (i + 1)) for i in range(4)]
    graphs = [StaticGraph(case.den, (x0.clone(), s.expand(case.B).clone(), case.cond), keep=(2,)) for s in s_pts]
    singles = [med(time_ms(g.graph.replay, case.device, case.warmup, case.reps)) for g in graphs]
    gden, probe_s = calls["gden"], sigmas[STEP].expand(case.B).clone()
    streams = [torch.cuda.Stream(case.device) for _ in graphs]

    def step():
        gden(x0, probe_s, case.cond)
        cur = torch.cuda.current_stream(case.device)
        for g, st in zip(graphs, streams):
            st.wait_stream(cur)
            with torch.cuda.stream(st):
                g.graph.replay()
        for st in streams:
            cur.wait_stream(st)

    t_streams = med(time_ms(step, case.device, case.warmup, case.reps))
    model = c[1] + max(singles) + arith + gather
    del graphs
    return {"singles_ms": singles, "streams_ms": t_streams + arith, "model_ms": model, "gather_ms": gather,
            "arith_ms": arith}


# ----------------------------------------------------------------------------------------- identity
def identity_check(rank, world, group, device, machine, results: Results | None, tiny: bool) -> list[dict]:
    """Point-parallel vs single-GPU final latents, SD1.5 UNet in float32 (TF32 off), fixed seeds, K = 2 and 4."""
    spec = dict((TINY if tiny else FULL)["sd15"], dtype=torch.float32)
    res = 64 if tiny else 512
    prev = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    rows = []
    try:
        model = build_model("sd15", spec, device, seed=0)
        if world > 1:
            for p in model.parameters():  # identical weights everywhere, whatever the init did
                dist.broadcast(p.data, 0, group=group)
        case = make_case("sd15", res, device, tiny=tiny, model=model, spec_override={"dtype": torch.float32})
        sigmas = grid("sd15", 5, device)
        x0 = case.x0(sigmas, seeds=[7])
        for K in (2, 4):
            table = uniform_table(5, K)
            ref = solve("epd", case.den, x0, sigmas, cond=case.cond, table=table).x
            ref_f = GraphedEPDSampler(case.den, table, check_finite=False).run(x0, sigmas, case.cond).x
            for path in ("solve", "fused_graph"):
                ppd = PointParallelDenoiser(case.den, group, batch=1)
                if path == "solve":
                    got = solve("epd", ppd, x0, sigmas, cond=case.cond, table=table).x
                else:
                    got = GraphedEPDSampler(ppd, table, check_finite=False).run(x0, sigmas, case.cond).x
                base = ref if path == "solve" else ref_f
                rel = float((got - base).norm() / base.norm())
                xs = [torch.empty_like(got) for _ in range(world)]
                if world > 1:
                    dist.all_gather(xs, got.contiguous(), group=group)
                else:
                    xs = [got]
                row = {"row_type": "identity", "backbone": "sd15", "resolution": res, "dtype": "float32", "tf32": False,
                       "K": K, "gpus": world, "gpu": machine["gpu"], "path": path, "rel_diff_vs_one_gpu": rel,
                       "ranks_identical": all(torch.equal(xs[0], v) for v in xs[1:]), "seeds": [7],
                       "grid_points": 5, "pass": bool(rel <= 1e-5), "finite": bool(torch.isfinite(got).all()),
                       "points_per_rank": K // world, "gathers": ppd.gathers}
                rows.append(row)
                if results is not None:
                    results.add(row)
        del case, model
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev
    return rows


# ----------------------------------------------------------------------------------------- summary
def summary_rows(case, machine, calls, one, two, world, results: Results, sim=None) -> None:
    """The interface rows (``epd_k2_step_ratio``, ``solver_overhead_fraction``) and the issue-11 rows."""
    c, t1 = calls["graph"], one["fused"]
    common = dict(row_type="summary", single_eval_step_ms=t1[1], euler_step_ms=t1["euler"], call_ms_1=c[1],
                  call_ms_2=c.get(2), eager_call_ms_1=calls["eager"].get(1), path="fused_graph",
                  graph_errors=one.get("graph_errors") or None)
    results.add(base_row(case, machine, gpus=1, K=2, epd_k2_step_ms=t1[2], epd_k2_step_ratio=t1[2] / t1[1],
                         epd_k2_vs_euler_ratio=t1[2] / t1["euler"], solver_overhead_fraction=one["overhead"][2],
                         solver_overhead_by_step={str(k): v for k, v in one["overhead"].items()},
                         solve_path_overhead_fraction=one["solve_overhead"].get(2),
                         solve_path_k2_step_ratio=(one["solve"][2] / one["solve"][1]) if one["solve"] else None,
                         graphed=all(one["graphed"].values()), **common))
    if two:
        t2 = two["fused"]
        den2 = {K: c[1] + c[-(-K // world)] for K in t2}
        results.add(base_row(case, machine, gpus=world, K=2, epd_k2_step_ms=t2[2], epd_k2_step_ratio=t2[2] / t1[1],
                             one_gpu_epd_k2_step_ratio=t1[2] / t1[1], epd_k2_vs_euler_ratio=t2[2] / t1["euler"],
                             solver_overhead_fraction=(t2[2] - den2[2]) / den2[2],
                             solver_overhead_by_step={str(k): (t2[k] - den2[k]) / den2[k] for k in t2},
                             solve_path_k2_step_ms=two["solve"].get(2),
                             solve_path_k2_step_ratio=(two["solve"][2] / one["solve"][1])
                             if 2 in two["solve"] and one["solve"] else None,
                             ranks_identical=all(two["ranks_identical"].values()) if two["ranks_identical"] else None,
                             graphed=all(two["graphed"].values()), **common))
        for K in t2:
            results.add(base_row(case, machine, row_type="step", gpus=world, K=K, path="fused_graph", step_ms=t2[K],
                                 step_ratio=t2[K] / t1[1], single_eval_step_ms=t1[1], denoiser_ms=den2[K],
                                 solver_overhead_fraction=(t2[K] - den2[K]) / den2[K],
                                 points_per_gpu=-(-K // world), padded=bool(K % world),
                                 ranks_identical=two["ranks_identical"].get(K), graphed=two["graphed"].get(K),
                                 graph_error=two["graph_errors"].get(str(K))))
        if case.res == 1024 and case.name in ("flux", "sd3"):
            for K in (2, 3, 4):
                results.add({"row_type": "issue11", "backbone": case.name, "resolution": case.res, "K": K,
                             "gpus": world, "gpu": machine["gpu"], "step_ratio": t2[K] / t1[1], "step_ms": t2[K],
                             "single_eval_step_ms": t1[1], "points_per_gpu": -(-K // world),
                             "note": "4-GPU machine kinds were not lent in this session; measured on 2 GPUs "
                                     f"({-(-K // world)} point(s) per GPU"
                                     + (", K=3 padded: rank 1 evaluates 1 point" if K == 3 else "") + ")"})
    if sim:
        results.add({"row_type": "simulation", "simulation": True, "simulated_gpus": 4, "gpus": 1,
                     "backbone": case.name, "resolution": case.res, "K": 4, "gpu": machine["gpu"],
                     "step_ratio": sim["model_ms"] / t1[1], "model_step_ms": sim["model_ms"],
                     "streams_step_ms": sim["streams_ms"],
                     "streams_step_ratio": sim["streams_ms"] / t1[1] if sim["streams_ms"] else None,
                     "single_point_ms": sim["singles_ms"], "gather_ms_from_2gpu": sim["gather_ms"],
                     "single_eval_step_ms": t1[1],
                     "note": "SIMULATION on one GPU, not a 4-GPU measurement: model = probe + slowest of 4 single-point "
                             "graph replays (" + ("each timed alone" if sim["streams_ms"] else "the measured one-point "
                             "call, all 4 having its shape") + ") + the one-GPU step's non-denoiser time + the 2-GPU "
                             "all-gather cost" + ("; streams = probe + 4 single-point graphs on 4 concurrent streams of "
                             "this one GPU (they share its SMs: an upper bound)" if sim["streams_ms"] else
                             "; concurrent-stream timing not run in this call")})


# ----------------------------------------------------------------------------------------- standalone
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_rank(rank: int, world: int, port: int, tiny: bool, timeout_s: float = 300):
    """Process group (NCCL on GPUs, gloo on CPU) plus a gloo group for barriers; returns (device, group, ctrl)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    backend = "gloo" if tiny or not torch.cuda.is_available() else "nccl"
    if tiny:
        torch.set_num_threads(1)
    init_point_parallel(world, backend=backend, rank=rank, timeout_s=timeout_s)
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    import datetime

    ctrl = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s)) if world > 1 else None
    return device, None, ctrl


def _worker(rank, world, port, args):
    torch.set_grad_enabled(False)  # inference: CUDA graphs apply only without autograd
    device, group, ctrl = setup_rank(rank, world, port, args.tiny)
    machine = machine_info(device)
    out = Path(args.out_dir)
    steps = Results(out / "gpu_epd_step.json", "gpu_epd_step", machine, tiny=args.tiny) if rank == 0 else None
    ident = Results(out / "gpu_identity.json", "gpu_identity", machine, tiny=args.tiny) if rank == 0 else None
    if not args.skip_identity:
        identity_check(rank, world, group, device, machine, ident, args.tiny)
    cases = TINY_CASES if args.tiny else CASES
    for name, res in cases:
        case = make_case(name, res, device, tiny=args.tiny)
        calls = one = None
        if rank == 0:
            calls = measure_calls(case, machine, None, eager=False)
            one = one_gpu_steps(case, machine, calls, None)
        if ctrl is not None:
            dist.barrier(group=ctrl)
        two = two_gpu_steps(case, machine, group, ctrl, None) if world > 1 else None
        if rank == 0:
            sim = simulate_four_gpus(case, calls, one, two) if device.type == "cuda" else None
            summary_rows(case, machine, calls, one, two, world, steps, sim)
        del case
    if rank == 0:
        steps.write(complete=True)
        ident.write(complete=True)
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--gpus", type=int, default=None, help="ranks (default: all visible GPUs, at most 2)")
    ap.add_argument("--tiny", action="store_true", help="toy configs on the CPU with gloo (smoke test)")
    ap.add_argument("--skip-identity", action="store_true")
    args = ap.parse_args(argv)
    world = args.gpus or (min(2, torch.cuda.device_count()) if not args.tiny else 2)
    if not args.tiny:
        init_check = torch.cuda.device_count()
        if init_check < world:
            ap.error(f"--gpus {world}: only {init_check} CUDA device(s) visible")
    torch.multiprocessing.spawn(_worker, args=(world, free_port(), args), nprocs=world, join=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
