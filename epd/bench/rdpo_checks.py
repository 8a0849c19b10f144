"""The two identities of ``epd bench rdpo`` run through the real command (``python -m epd.cli rdpo``).

A short RDPO run (4 steps, a checkpoint each step, 64 selection seeds) three ways: one process; ``--gpus 2``
(gloo ranks on the CPU, same global batch): largest absolute difference of the exported tables; and one process
sent SIGTERM once a random step's checkpoint exists, then the same command again: its table files against the
uninterrupted run's, byte for byte (and the exit status of the interrupted run, 143).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ..errors import EPDError

__all__ = ["dp_and_preempt"]

CHECK_RDPO = {"steps": 4, "save_interval": 1, "eval_interval": 2, "eval": {"seeds": "50000-50063"}}
TABLE_FILES = ("table_best.safetensors", "table_best.json", "table_final.safetensors", "table_final.json")


def _config(ctx: dict, workdir: Path) -> Path:
    cfg = yaml.safe_load(Path(ctx["config"]).read_text())
    sec = cfg["backbones"][ctx["sec"]["name"]]
    sec["rdpo"] = {**(sec.get("rdpo") or {}), **CHECK_RDPO}
    path = workdir / "check_rdpo.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _start(ctx: dict, cfg: Path, workdir: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = [sys.executable, "-m", "epd.cli", "rdpo", "--config", str(cfg), "--backbone", ctx["sec"]["name"],
           "--init", str(workdir / "distilled.safetensors"), "--weights", str(ctx["wdir"]), "--out", str(out), *extra]
    log = open(out.with_suffix(".log"), "a")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, what: str, expect: int = 0) -> int:
    rc = proc.wait(timeout=3600)
    if rc != expect:
        raise EPDError(f"bench rdpo: the {what} run exited with {rc} (expected {expect}); see its .log beside it")
    return rc


def _max_abs_diff(a: Path, b: Path) -> float:
    from ..predictor import load

    diff = 0.0
    for name in ("table_best", "table_final"):
        ta, tb = load(a / f"{name}.safetensors"), load(b / f"{name}.safetensors")
        for k, v in ta.tensors().items():
            diff = max(diff, float((v.double() - tb.tensors()[k].double()).abs().max()))
    return diff


def _preempt(ctx: dict, cfg: Path, workdir: Path, out: Path, rng: random.Random) -> dict:
    at = rng.randint(1, CHECK_RDPO["steps"] - 2)  # the signal lands during step at + 1
    proc = _start(ctx, cfg, workdir, out)
    marker = out / "checkpoints" / f"policy-step{at:06d}.pt"
    while not marker.exists() and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    rc = _finish(proc, "preempted", 128 + signal.SIGTERM)
    _finish(_start(ctx, cfg, workdir, out), "resumed")
    return {"signal_after_step": at, "exit_status": rc}


def dp_and_preempt(ctx: dict, workdir: Path, seed: int | None = None) -> dict:
    """Run the three short runs; returns the bench keys ``dp_identity_max_abs_diff``, ``preempt_resume_identical``."""
    cfg = _config(ctx, workdir)
    runs = {name: workdir / f"check_{name}" for name in ("one", "two", "preempt")}
    for d in runs.values():
        shutil.rmtree(d, ignore_errors=True)
        d.with_suffix(".log").unlink(missing_ok=True)
    t0 = time.time()
    _finish(_start(ctx, cfg, workdir, runs["one"]), "one-process")
    _finish(_start(ctx, cfg, workdir, runs["two"], "--gpus", "2"), "--gpus 2")
    pre = _preempt(ctx, cfg, workdir, runs["preempt"], random.Random(seed))
    same = all((runs["one"] / f).read_bytes() == (runs["preempt"] / f).read_bytes() for f in TABLE_FILES)
    return {"dp_identity_max_abs_diff": _max_abs_diff(runs["one"], runs["two"]), "preempt_resume_identical": same,
            "checks": {"rdpo": CHECK_RDPO, "preempt": pre, "files_compared": list(TABLE_FILES),
                       "seconds": round(time.time() - t0, 1)}}
