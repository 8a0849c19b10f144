"""Issue 25: RDPO step time on 1 and G GPUs (data parallel), and the same policy from the same seed.

    source benchmarks/gpu_env.sh && python benchmarks/gpu_rdpo_dp.py --gpus 1,2 \\
        --study configs/sd3_1024.yaml:sd3_1024 --study configs/flux_dev.yaml:flux_dev --out $OUT/gpu_rdpo_dp.json

Per backbone (``--study CONFIG:BACKBONE``, or ``--config`` / ``--backbone`` pairs):

1. Weights: ``epd weights fake --size full`` (``--size tiny`` on the CPU) writes the backbone and HPSv2.1 into
   ``WORKDIR/weights`` unless ``--weights`` names a root; a backbone written here at full size is deleted after its
   runs, so SD3 and FLUX never lie on the disk together.
2. Config: the backbone's own, with the paper's per-batch RDPO settings kept (``rollout_batch_size`` 8 global,
   ``rloo_k`` 4, ``minibatch_size``, ``eval_batch``), the reward set to HPSv2.1 only, ``steps`` S, and the held-out
   evaluation reduced to ``--eval-seeds`` seeds. ``eval_interval`` and ``save_interval`` are S + 1, so the trainer
   evaluates only the start table (before its clock starts) and after the last step, and saves only at the end.
3. Start table: the uniform cold-start table (:func:`epd.table.uniform_table`) of the config's student (``K``,
   ``afs``, schedule) at its first ``rdpo_nfes`` (the workflow starts from the distilled table: the step cost does
   not depend on the table's values).
4. ``epd rdpo --gpus G`` for G = 1 (the reference, always run first) and every other G, same config and seed, each
   in a fresh run folder. ``--shard-update`` is passed through.
5. Step time: ``metrics.jsonl`` holds ``elapsed_sec`` per step, the clock read *before* that step's evaluation, so
   the interval of step s (``elapsed[s] - elapsed[s-1]``) holds the evaluation of step s - 1 when there was one.
   ``step_s`` is the median of the intervals whose previous step had no evaluation, step 1 left out (first-call
   warm-up) unless nothing else is left; ``timed_steps`` names them. ``speedup_vs_1gpu`` = step_s(1) / step_s(G).
6. Same policy: ``max_abs_diff`` = the largest difference of ``table_final`` (positions, weights, scales; a missing
   scale counts as ones) from the one-process run; ``identical`` = ``max_abs_diff <= --tol`` (1e-6).

Rows ``{backbone, resolution, gpus, step_s, speedup_vs_1gpu, identical, gpu, ...}`` are written atomically as each
run ends (a run cut short keeps the finished rows; ``--budget-s`` stops starting runs that cannot finish). A G
larger than the visible GPU count gives a row with ``ok: false`` and the reason, not a crash.

On the CPU (``--device cpu``: G gloo processes) every process gets one thread (``OMP_NUM_THREADS=1``, so G
processes are G workers against one) and MKL's strict reproducible mode (``MKL_CBWR=AVX2,STRICT``): by default
MKL's single-precision GEMM rounds a row differently depending on how many rows the call has (a rank rolls out 4
images where one process rolls out 8), which alone moves the tables by about 3e-6 after two steps. On GPUs the
same batch dependence exists in cuBLAS and has no switch, so ``max_abs_diff`` there measures it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_common import Results  # noqa: E402

REWARD = "hps"
CPU_ENV = {"OMP_NUM_THREADS": "1", "MKL_CBWR": "AVX2,STRICT"}
ENV_KEYS = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS", "CUDA_VISIBLE_DEVICES",
            "OMP_NUM_THREADS", "MKL_CBWR")


# ------------------------------------------------------------------------------------------- pure helpers
def step_times(history: list[dict]) -> dict:
    """Per-step seconds from ``metrics.jsonl`` records: ``{"step_s", "timed_steps", "intervals"}``.

    The interval of step s is ``elapsed[s] - elapsed[s-1]`` (``elapsed[0] = 0``: the clock starts after the start
    evaluation). It is timed when step s - 1 had no held-out evaluation (``eval_reward`` in its record: that
    evaluation ran after its clock reading, inside this interval), and s > 1 (warm-up) unless nothing else is left.
    """
    recs = sorted((h for h in history if h.get("step", 0) >= 1 and "elapsed_sec" in h), key=lambda h: h["step"])
    intervals, clean = {}, []
    prev_t, prev_eval = 0.0, False
    for h in recs:
        s = int(h["step"])
        intervals[s] = round(float(h["elapsed_sec"]) - prev_t, 4)
        if not prev_eval:
            clean.append(s)
        prev_t, prev_eval = float(h["elapsed_sec"]), "eval_reward" in h
    timed = [s for s in clean if s > 1] or clean
    return {"step_s": statistics.median(intervals[s] for s in timed) if timed else None, "timed_steps": timed,
            "intervals": intervals}


def table_diff(a, b) -> float:
    """Largest absolute difference of two tables' tensors (a scale one table lacks counts as ones)."""
    import torch

    ta, tb = a.tensors(), b.tensors()
    diff = 0.0
    for k in sorted(set(ta) | set(tb)):
        x = ta.get(k, torch.ones_like(tb.get(k, torch.zeros(0))))
        y = tb.get(k, torch.ones_like(x))
        if x.shape != y.shape:
            return float("inf")
        diff = max(diff, float((x.double() - y.double()).abs().max()) if x.numel() else 0.0)
    return diff


def bench_config(full: dict, backbone: str, steps: int, eval_seeds: int) -> dict:
    """The backbone's config with the paper's per-batch RDPO settings, HPS only, ``steps`` steps, evaluation only
    at the start and the end, and ``eval_seeds`` held-out seeds."""
    sec = dict(full["backbones"][backbone])
    r = dict(sec["rdpo"])
    r.update(steps=steps, eval_interval=steps + 1, save_interval=steps + 1, rewards={REWARD: 1.0},
             eval={**(r.get("eval") or {}), "seeds": f"100000-{100000 + eval_seeds - 1}"})
    r.pop("guard_metric", None)
    sec["rdpo"] = r
    return {"run": dict(full["run"]), "report": {"external": []}, "backbones": {backbone: sec}}


def start_table(sec: dict):
    """Uniform cold-start table of the section's student at its first RDPO NFE."""
    from epd.study import study_spec
    from epd.table import uniform_table

    spec = study_spec(sec, int(sec["rdpo_nfes"][0]))
    meta = {"backbone": sec.get("kind"), "afs": spec.afs}
    if spec.schedule:
        meta["schedule_type"] = spec.schedule
    return uniform_table(spec.N, spec.K, meta=meta)


def parse_gpus(text: str) -> list[int]:
    try:
        gs = sorted({int(g) for g in text.split(",") if g.strip()})
    except ValueError:
        raise SystemExit(f"--gpus: expected a comma-separated list of integers like 1,2; got {text!r}") from None
    if not gs or gs[0] < 1:
        raise SystemExit(f"--gpus: counts must be >= 1; got {text!r}")
    return sorted({1, *gs})  # the one-process run is the reference of every other row


def parse_cases(args) -> list[tuple[str, str]]:
    cases = []
    for item in args.study:
        cfg, sep, name = item.rpartition(":")
        if not sep or not cfg or not name:
            raise SystemExit(f"--study: expected CONFIG:BACKBONE, got {item!r}")
        cases.append((cfg, name))
    if len(args.config) != len(args.backbone):
        raise SystemExit("--config and --backbone: give them in pairs (one --backbone per --config)")
    cases += list(zip(args.config, args.backbone))
    if not cases:
        raise SystemExit("give at least one backbone: --study CONFIG:BACKBONE or --config FILE --backbone NAME")
    return cases


# ------------------------------------------------------------------------------------------- machine
def probe(device: str) -> dict:
    """GPU count and names, machine and versions, read in a child process so this one never holds a CUDA
    context (its memory would be missing on GPU 0 during the runs)."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--probe", device], cwd=ROOT,
                          capture_output=True, text=True, env=_env({}))
    if proc.returncode != 0:
        raise SystemExit(f"probing the machine failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _probe_main(device: str) -> None:
    from importlib import metadata

    import torch

    from benchmarks.gpu_common import machine_info

    n = torch.cuda.device_count() if device == "cuda" else 0
    names = [torch.cuda.get_device_name(i) for i in range(n)]
    machine = machine_info(torch.device("cuda" if n else "cpu"))
    versions = {"python": machine["python"], "cuda": machine["cuda"], "driver": machine["driver"]}
    for dist in ("torch", "diffusers", "transformers", "open_clip_torch", "safetensors"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    versions["epd_commit"] = git.stdout.strip() if git.returncode == 0 else None
    print(json.dumps({"count": n, "names": names, "machine": machine, "versions": versions}))


def _env(extra: dict) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)
    env.pop("MLFLOW_TRACKING_URI", None)  # no tracking inside a timing
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([str(ROOT)] if str(ROOT) not in paths else []))
    return env


# ------------------------------------------------------------------------------------------- runs
def run_command(cmd: list[str], env: dict, log: Path, timeout: float | None) -> tuple[int, float]:
    """Run ``cmd`` from the repository root with output to ``log``; on timeout stop its process group (SIGTERM,
    then SIGKILL after 20 s) and return 124. Returns ``(exit status, seconds)``."""
    t0 = time.time()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = 124
    return rc, time.time() - t0


def log_tail(log: Path, n: int = 12) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip() and "\r" not in ln
             and " INFO " not in ln] if log.exists() else []
    return "\n".join(lines[-n:])


class Bench:
    """One benchmark invocation: the machine, the deadline, the result file."""

    def __init__(self, args, info: dict, gpus: list[int]):
        self.args, self.info, self.gpus = args, info, gpus
        self.weights_s: dict[str, float] = {}
        self.work = Path(args.workdir).resolve()
        self.deadline = time.time() + args.budget_s if args.budget_s else None
        self.env = _env(CPU_ENV if args.device == "cpu" else {})
        self.results = Results(args.out, "gpu_rdpo_dp", info["machine"], issue=25, target_speedup=1.8,
                               versions=info["versions"], argv=sys.argv[1:],
                               env={k: self.env.get(k) for k in ENV_KEYS})

    def left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.time()

    def gpu_label(self, g: int) -> str:
        if self.args.device == "cpu":
            return "cpu (gloo)" if g > 1 else "cpu"
        names = self.info["names"][:g]
        return names[0] if len(set(names)) == 1 else " + ".join(names)

    def write_weights(self, kind: str, root: Path, with_reward: bool) -> str | None:
        """``epd weights fake`` for ``kind`` (and HPS); returns an error text or None."""
        cmd = [sys.executable, "-m", "epd.cli", "weights", "fake", "--size", self.args.size, "--backbones", kind,
               "--scorers", REWARD if with_reward else "none", "--out", str(root), "--force"]
        log = self.work / "logs" / f"weights_{kind}.log"
        rc, sec = run_command(cmd, self.env, log, self.left())
        print(f"[gpu_rdpo_dp] fake {self.args.size} weights for {kind}: rc {rc}, {sec:.1f} s", flush=True)
        self.weights_s[kind] = round(sec, 1)
        return None if rc == 0 else f"epd weights fake failed (rc {rc}):\n{log_tail(log)}"

    # --------------------------------------------------------------------------------------- one backbone
    def case(self, config: str, name: str, reward_written: bool) -> bool:
        """All rows of one backbone; returns whether HPS now lies in the weights root."""
        from epd.config import load_config
        from epd.predictor import save

        args = self.args
        full = load_config(config)
        if name not in full.get("backbones", {}):
            raise SystemExit(f"--backbone: {name!r} is not in {config}; configured: {sorted(full['backbones'])}")
        cfg = bench_config(full, name, args.steps, args.eval_seeds or max(self.gpus[-1], 2))
        sec = cfg["backbones"][name]
        kind, r = sec.get("kind", name), sec["rdpo"]
        base = {"backbone": kind, "study": name, "config": config, "resolution": sec.get("resolution"),
                "nfe": int(sec["rdpo_nfes"][0]), "size": args.size, "device": args.device,
                "rollout_batch_size": r.get("rollout_batch_size"), "rloo_k": r.get("rloo_k"),
                "minibatch_size": r.get("minibatch_size"), "eval_batch": r.get("eval_batch"), "reward": REWARD,
                "steps": args.steps, "eval_seeds": r["eval"]["seeds"], "shard_update": bool(args.shard_update),
                "seed": r.get("seed", 0), "machine": self.info["machine"], "versions": self.info["versions"]}
        d = self.work / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        init = save(start_table(sec), d / "init")
        root, error = self._weights(kind, reward_written)
        base["fake_weights_s"] = self.weights_s.get(kind)  # time to write this backbone's fake weights (if any)
        ref: dict | None = None
        for g in self.gpus:
            row, table = self.run_one(base, d, name, init, root, g, ref, error)
            if g == 1 and row["ok"]:
                ref = {"table": table, "row": row}
            self.results.add(row)
            print(f"[gpu_rdpo_dp] {kind} {base['resolution']} gpus={g}: ok={row['ok']} step_s={row['step_s']} "
                  f"speedup={row['speedup_vs_1gpu']} max_abs_diff={row['max_abs_diff']} {row['error'] or ''}",
                  flush=True)
        if not args.weights and not error and args.size == "full" and not args.keep_weights:
            from epd.fake_weights import planned_paths

            for rel in planned_paths([kind]):
                shutil.rmtree(root / rel, ignore_errors=True)
        return reward_written or (not args.weights and error is None)

    def _weights(self, kind: str, reward_written: bool) -> tuple[Path, str | None]:
        if self.args.weights:
            return Path(self.args.weights).resolve(), None
        root = self.work / "weights"
        if self.args.device == "cuda" and self.info["count"] < 1:
            return root, "no GPU visible (torch.cuda.device_count() == 0): weights not written, nothing run"
        return root, self.write_weights(kind, root, not reward_written)

    def run_one(self, base: dict, d: Path, name: str, init: Path, root: Path, g: int, ref: dict | None,
                error: str | None) -> tuple[dict, object]:
        """``epd rdpo --gpus g`` and its row (with the final table, for the reference)."""
        from epd.predictor import load

        args = self.args
        row = {**base, "gpus": g, "gpu": None, "ok": False, "error": error, "step_s": None, "speedup_vs_1gpu": None,
               "identical": None, "max_abs_diff": None}
        visible = self.info["count"] if args.device == "cuda" else g
        left = self.left()
        if row["error"] is None and g > visible:
            row["error"] = (f"--gpus {g}: only {visible} GPU(s) visible here (CUDA_VISIBLE_DEVICES="
                            f"{os.environ.get('CUDA_VISIBLE_DEVICES')}); run on a machine with {g} GPUs")
        elif row["error"] is None and left is not None and left < 30:
            row["error"] = f"not run: --budget-s {args.budget_s} spent ({left:.0f} s left)"
        if row["error"] is not None:
            return row, None
        row["gpu"], row["gpu_names"] = self.gpu_label(g), self.info["names"][:g]
        out = d / f"gpus{g}"
        cmd = [sys.executable, "-m", "epd.cli", "rdpo", "--config", str(d / "config.yaml"), "--backbone", name,
               "--init", str(init), "--out", str(out), "--steps", str(args.steps), "--device", args.device,
               "--gpus", str(g)] + (["--shard-update"] if args.shard_update and g > 1 else [])
        log = self.work / "logs" / f"{name}_gpus{g}.log"
        rc, wall = run_command(cmd, {**self.env, "EPD_WEIGHTS_DIR": str(root)}, log, left)
        row["wall_s"] = round(wall, 2)
        if rc != 0:
            row["error"] = f"epd rdpo --gpus {g} exited {rc}" + (" (timeout)" if rc == 124 else "") + \
                f":\n{log_tail(log)}"
            return row, None
        hist = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        times = step_times(hist)
        table = load(out / "table_final.safetensors")
        step1 = next((h for h in hist if h.get("step") == 1), {})
        row.update(ok=True, step_s=times["step_s"], timed_steps=times["timed_steps"],
                   step_intervals_s=times["intervals"], reward_mean_step1=step1.get("mixed_reward_mean"),
                   eval_reward_final=hist[-1].get("eval_reward"))
        if g == 1:
            row.update(speedup_vs_1gpu=1.0, identical=True, max_abs_diff=0.0, reference=True)
        elif ref is not None:
            diff = table_diff(table, ref["table"])
            s1 = ref["row"]["step_s"]
            row.update(max_abs_diff=diff, identical=diff <= args.tol,
                       speedup_vs_1gpu=round(s1 / row["step_s"], 4) if s1 and row["step_s"] else None,
                       reward_mean_step1_diff=abs(row["reward_mean_step1"] - ref["row"]["reward_mean_step1"]))
        return row, table


def summary(rows: list[dict]) -> str:
    out = [f"{'backbone':8} {'res':>5} {'gpus':>4} {'step_s':>9} {'speedup':>8} {'identical':>9} {'max_abs_diff':>12}"
           "  gpu"]
    for r in rows:
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        out.append(f"{r['backbone']:8} {r['resolution']!s:>5} {r['gpus']:>4} {fmt(r['step_s'], '9.3f')} "
                   f"{fmt(r['speedup_vs_1gpu'], '8.3f')} {str(r['identical']):>9} {fmt(r['max_abs_diff'], '12.3g')}  "
                   f"{r['gpu'] or r['error'].splitlines()[0]}")
    return "\n".join(out)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", action="append", default=[], metavar="CONFIG:BACKBONE",
                   help="a config file and a backbone in it (repeatable), e.g. configs/sd3_1024.yaml:sd3_1024")
    p.add_argument("--config", action="append", default=[], help="config file (pairs with --backbone; repeatable)")
    p.add_argument("--backbone", action="append", default=[], help="backbone name in the --config of the same rank")
    p.add_argument("--gpus", default="1,2", help="process counts to time (1 is always run: the reference)")
    p.add_argument("--steps", type=int, default=4, help="RDPO steps per run (>= 2: step 1 is warm-up)")
    p.add_argument("--eval-seeds", type=int, default=None,
                   help="held-out seeds evaluated at the start and the end (default: the largest --gpus, >= 2)")
    p.add_argument("--weights", default=None, help="existing weights root (EPD_WEIGHTS_DIR); default: write fake "
                                                   "weights of --size into WORKDIR/weights")
    p.add_argument("--size", choices=("full", "tiny"), default="full", help="fake weights to write")
    p.add_argument("--keep-weights", action="store_true", help="keep full-size fake weights after each backbone")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda: one GPU per process (NCCL); cpu: gloo processes, one thread each")
    p.add_argument("--shard-update", action="store_true", help="pass --shard-update to the multi-process runs")
    p.add_argument("--tol", type=float, default=1e-6, help="identical: max_abs_diff of table_final <= this")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_rdpo_dp.json"))
    p.add_argument("--workdir", default="/tmp/gpu_rdpo_dp", help="run folders, logs, written weights")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget: runs are stopped at it and later ones not started (rows say so)")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--probe"]:
        _probe_main(argv[1])
        return 0
    args = parser().parse_args(argv)
    if args.steps < 2:
        raise SystemExit("--steps: need >= 2 (step 1 holds the warm-up; later steps are timed)")
    cases, gpus = parse_cases(args), parse_gpus(args.gpus)
    if args.eval_seeds is not None and args.eval_seeds < gpus[-1]:
        raise SystemExit(f"--eval-seeds: every process needs a held-out seed; give at least {gpus[-1]}")
    info = probe(args.device)
    if args.device == "cuda" and info["count"] < gpus[-1]:
        print(f"[gpu_rdpo_dp] warning: --gpus {args.gpus} but {info['count']} GPU(s) visible; rows with more GPUs "
              "will say so (ok: false)", flush=True)
    bench = Bench(args, info, gpus)
    reward_written = False
    for config, name in cases:
        reward_written = bench.case(config, name, reward_written)
    rows = bench.results.doc["rows"]
    bench.results.write(complete=all(r["ok"] for r in rows))
    print(summary(rows))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
