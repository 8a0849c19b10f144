"""Every GPU benchmark of issue 9 (and the issue-11 fallback rows) in one launch, each network built once per rank.

One process per GPU (NCCL; gloo with ``--tiny`` on the CPU). Per backbone/resolution, in this order:

1. rank 0: per-call latency vs batch (:mod:`gpu_call_latency`), fused one-GPU steps and the unfused solve path
   (:mod:`gpu_epd_step`), and the one-GPU 4-GPU simulation for the 1024 px cases;
   at the same time rank 1 (its own GPU): images/s against diffusers' pipeline (:mod:`gpu_throughput`);
2. all ranks: point-parallel steps, K = 1..4 (K = 3 padded);
3. rank 0: summary rows with the interface keys.

Before the backbones, the point-parallel numerical identity check (SD1.5 UNet, float32). A failing backbone is
recorded and skipped; the ranks agree on it before any collective. Files (under ``--out-dir``):
``gpu_call_latency.json``, ``gpu_epd_step.json``, ``gpu_throughput.json``, ``gpu_identity.json``.

Usage::

    python benchmarks/gpu_all.py --out-dir $OUT                 # 2 GPUs (all visible, at most --gpus)
    python benchmarks/gpu_all.py --out-dir /tmp/all --tiny      # CPU smoke run, 2 gloo ranks
    python benchmarks/gpu_all.py --table benchmarks/results     # print the summary table of existing results
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_call_latency import measure_calls  # noqa: E402
from gpu_common import CASES, TINY_CASES, Results, fmt, free, machine_info, make_case  # noqa: E402
from gpu_epd_step import (free_port, identity_check, one_gpu_steps, setup_rank, simulate_four_gpus,  # noqa: E402
                          summary_rows, two_gpu_steps)
from gpu_throughput import measure_throughput  # noqa: E402


def _agree(ok: bool, ctrl, world: int) -> bool:
    if world == 1:
        return ok
    flags = [None] * world
    dist.all_gather_object(flags, bool(ok), group=ctrl)
    return all(flags)


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def _sim_row(case, machine, calls, one, sim, results) -> None:
    """Only the simulation row of :func:`gpu_epd_step.summary_rows` (written after the measured rows)."""
    scratch = Results.__new__(Results)
    scratch.doc, scratch.path = {"rows": []}, None
    scratch.write = lambda complete=None: None
    summary_rows(case, machine, calls, one, None, 1, scratch, sim)
    for r in scratch.doc["rows"]:
        if r.get("row_type") == "simulation":
            results.add(r)


def worker(rank: int, world: int, port: int, args) -> None:
    torch.set_grad_enabled(False)  # inference: CUDA graphs apply only without autograd
    device, group, ctrl = setup_rank(rank, world, port, args.tiny, timeout_s=args.timeout)
    machine = machine_info(device)
    out = Path(args.out_dir)
    tp_rank = 1 if world > 1 else 0
    R = {}
    if rank == 0:
        R["calls"] = Results(out / "gpu_call_latency.json", "gpu_call_latency", machine, tiny=args.tiny)
        R["steps"] = Results(out / "gpu_epd_step.json", "gpu_epd_step", machine, tiny=args.tiny, world=world)
        R["ident"] = Results(out / "gpu_identity.json", "gpu_identity", machine, tiny=args.tiny, world=world)
    if rank == tp_rank and not args.skip_throughput:
        R["tp"] = Results(out / "gpu_throughput.json", "gpu_throughput", machine, tiny=args.tiny,
                          note=f"measured on rank {rank}'s GPU while rank 0 ran the latency benchmarks on its own GPU")
    t_all = time.time()
    if not args.skip_identity:
        t0 = time.time()
        try:
            identity_check(rank, world, group, device, machine, R.get("ident"), args.tiny)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            if rank == 0:
                R["ident"].add({"row_type": "identity", "error": _err(e)})
        print(f"[rank {rank}] identity check {time.time() - t0:.1f}s", flush=True)
    cases = TINY_CASES if args.tiny else CASES
    if args.cases:
        cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases.split(",")]
    for name, res in cases:
        t0 = time.time()
        case = calls = one = two = sim = None
        try:
            case = make_case(name, res, device, tiny=args.tiny, quick=args.quick)
            ok = True
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            ok, build_err = False, _err(e)
        if not _agree(ok, ctrl, world):
            if rank == 0:
                R["steps"].add({"backbone": name, "resolution": res, "gpu": machine["gpu"],
                                "error": f"network build failed on a rank: {build_err if not ok else 'other rank'}"})
            case = None
            free()
            continue
        print(f"[rank {rank}] {name} {res}: built in {time.time() - t0:.1f}s", flush=True)
        ok1 = True
        if rank == 0:
            try:
                calls = measure_calls(case, machine, R["calls"], eager=not (args.quick and res >= 1024))
                one = one_gpu_steps(case, machine, calls, R["steps"], solve_path=not (args.quick and res >= 1024))
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                ok1 = False
                R["steps"].add({"backbone": name, "resolution": res, "gpu": machine["gpu"], "gpus": 1,
                                "error": _err(e)})
        if rank == tp_rank and not args.skip_throughput:
            try:
                measure_throughput(case, machine, R["tp"])
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                R["tp"].add({"backbone": name, "resolution": res, "gpu": machine["gpu"], "error": _err(e)})
        print(f"[rank {rank}] {name} {res}: one-GPU part done at {time.time() - t0:.1f}s", flush=True)
        if world > 1 and _agree(ok1, ctrl, world):
            try:
                two = two_gpu_steps(case, machine, group, ctrl, None, gden=None,
                                    solve_ks=() if args.quick and res >= 1024 else (2,),
                                    check_ks=(2,) if args.quick else (1, 2, 3, 4))
            except Exception as e:  # noqa: BLE001 (a collective failing here may leave the peer waiting: timeout)
                traceback.print_exc()
                if rank == 0:
                    R["steps"].add({"backbone": name, "resolution": res, "gpu": machine["gpu"], "gpus": world,
                                    "error": _err(e)})
        if rank == 0 and one is not None:
            summary_rows(case, machine, calls, one, two, world, R["steps"])
            try:
                if device.type == "cuda" and (res >= 1024 or args.simulate_all):
                    sim = simulate_four_gpus(case, calls, one, two, streams=not args.quick)
                    _sim_row(case, machine, calls, one, sim, R["steps"])
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                R["steps"].add({"backbone": name, "resolution": res, "row_type": "simulation", "error": _err(e)})
        print(f"[rank {rank}] {name} {res}: done in {time.time() - t0:.1f}s (total {time.time() - t_all:.0f}s)",
              flush=True)
        calls = one = two = sim = case = None
        free()
        if world > 1:
            dist.barrier(group=ctrl)
    for r in R.values():
        r.write(complete=True)
    if world > 1:
        dist.barrier(group=ctrl)
    dist.destroy_process_group()


def print_table(folder: str | Path) -> None:
    """Short table of the interface numbers from the JSON files in ``folder``."""
    folder = Path(folder)

    def rows(name):
        p = folder / name
        return json.loads(p.read_text())["rows"] if p.exists() else []

    steps, tp, ident = rows("gpu_epd_step.json"), rows("gpu_throughput.json"), rows("gpu_identity.json")
    print("backbone res  gpus  1eval_ms  k2_ms  k2_ratio  vs_euler  ovh_frac  | throughput_vs_diffusers")
    tpd = {(r.get("backbone"), r.get("resolution")): r.get("throughput_vs_diffusers") for r in tp}
    for r in steps:
        if r.get("row_type") == "summary":
            print(f"{r['backbone']:8s} {r['resolution']:4d}  {r['gpus']:4d}  {fmt(r['single_eval_step_ms']):>8s} "
                  f"{fmt(r['epd_k2_step_ms']):>6s}  {fmt(r['epd_k2_step_ratio'], 3):>8s}  "
                  f"{fmt(r['epd_k2_vs_euler_ratio'], 3):>8s}  {fmt(r['solver_overhead_fraction'], 4):>8s}  | "
                  f"{fmt(tpd.get((r['backbone'], r['resolution'])), 3)}")
        elif r.get("error"):
            print(f"{r.get('backbone')} {r.get('resolution')} ERROR {r['error']}")
    for r in steps:
        if r.get("row_type") in ("issue11", "simulation"):
            print(f"{r['row_type']:10s} {r['backbone']} {r['resolution']} K={r['K']} gpus={r['gpus']} "
                  f"step_ratio={fmt(r['step_ratio'], 3)}")
    for r in ident:
        print(f"identity K={r.get('K')} {r.get('path')} rel={r.get('rel_diff_vs_one_gpu')} pass={r.get('pass')} "
              f"ranks_identical={r.get('ranks_identical')} {r.get('error', '')}")
    for r in tp:
        if r.get("error") or any(k.endswith("_error") for k in r):
            print(f"throughput {r.get('backbone')} {r.get('resolution')}:",
                  {k: v for k, v in r.items() if "error" in k})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--gpus", type=int, default=2, help="ranks (at most the visible GPUs)")
    ap.add_argument("--tiny", action="store_true", help="toy configs on the CPU with gloo (smoke test)")
    ap.add_argument("--cases", default=None, help="comma list backbone:resolution")
    ap.add_argument("--skip-identity", action="store_true")
    ap.add_argument("--quick", action="store_true", help="fewer repeats; no solve path/eager/stream simulation at 1024")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--simulate-all", action="store_true", help="4-GPU simulation for every case, not only 1024 px")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds a collective waits for a dead peer")
    ap.add_argument("--table", default=None, help="only print the summary table of the results in this folder")
    args = ap.parse_args(argv)
    if args.table:
        print_table(args.table)
        return 0
    if not args.out_dir:
        ap.error("--out-dir is required")
    world = args.gpus
    if not args.tiny:
        have = torch.cuda.device_count()
        if have < world:
            ap.error(f"--gpus {world}: only {have} CUDA device(s) visible")
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    torch.multiprocessing.spawn(worker, args=(world, free_port(), args), nprocs=world, join=True)
    print_table(args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
