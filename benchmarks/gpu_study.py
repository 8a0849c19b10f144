"""One real backbone through the whole Snakemake chain on one GPU, with full-size random weights.

    python -m benchmarks.gpu_study --config configs/sd3_1024.yaml --backbone sd3_1024 \
        --out benchmarks/results/gpu_study_sd3_1024.json [--weights DIR] [--counts small]

1. ``epd weights fake --size full`` writes random full-size weights for the backbone and every scorer into the
   resolver's layout (unless ``--weights`` already holds them), so the real loading code runs.
2. The study config is the backbone's own (paper per-batch settings: ``sample.batch``, ``teacher.batch``, RDPO
   rollout 8 / RLOO 4 / minibatch 4, ``rdpo.eval_batch``) with its *counts* scaled down (prompts, seeds, steps,
   iterations; see :data:`COUNTS`), one baseline beside the distilled and RDPO tables, and released tables left out.
3. ``snakemake --cores all`` runs it; every ``epd`` job appends its wall time and GPU peak memory to
   ``$EPD_RESOURCE_LOG`` (:func:`epd.cli._record_resources`).
4. Rows ``{backbone, resolution, stage, ok, wall_s, per_item_s, peak_alloc_gib, peak_reserved_gib, gpu,
   projected_gpu_hours}`` per stage; the projection scales each stage's per-item time to the full paper study
   (1,000 evaluation prompts x solver rows x six metrics, the config's teacher seeds and distillation iterations,
   RDPO to the released step count). Per-item times include each job's model loading, so at these small counts the
   projection is an upper bound.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from epd.io import parse_seeds
from epd.report.cost import PAPER_SCALE_KEYS, paper_scale, projected_hours

# Scaled-down counts: peak memory is set by the batch settings, which stay at the paper's values.
COUNTS = {"eval_prompts": 8, "teacher_seeds": 8, "distill_iterations": 4, "rdpo_steps": 4, "rdpo_eval_seeds": 8}
# epd command of a job -> study stage (Snakemake does not tell a job its rule name; every rule calls one command)
STAGES = {"teacher": "teacher", "distill": "distill", "rdpo": "rdpo", "sample": "sample", "evaluate": "evaluate",
          "report": "report"}


def stage_of(row: dict) -> str:
    return STAGES.get(row.get("command") or "", "")
METRICS = ["hps", "pickscore", "imagereward", "clip", "aesthetic", "mps"]


def study_config(config: dict, backbone: str, counts: dict, tracking_uri: str) -> dict:
    """The backbone's config with counts scaled down and batch settings kept."""
    cfg = {"run": {**config["run"], "tracking_uri": tracking_uri, "study": f"gpu_{backbone}"},
           "report": {"external": []}, "backbones": {backbone: dict(config["backbones"][backbone])}}
    sec = cfg["backbones"][backbone]
    nfe = sec["distill_nfes"][0]
    sec.update(solvers=["euler"], nfes=[nfe], distill_nfes=[nfe], rdpo_nfes=[nfe], metrics=METRICS, predictors={})
    sec["sample"] = {**sec.get("sample", {}), "seeds": f"0-{counts['eval_prompts'] - 1}"}
    sec["teacher"] = {**sec["teacher"], "seeds": f"0-{counts['teacher_seeds'] - 1}"}
    sec["distill"] = {**sec["distill"], "iterations": counts["distill_iterations"]}
    r = counts["rdpo_steps"]
    sec["rdpo"] = {**sec["rdpo"], "steps": r, "save_interval": r, "eval_interval": r,
                   "eval": {**sec["rdpo"].get("eval", {}),
                            "seeds": f"100000-{100000 + counts['rdpo_eval_seeds'] - 1}"}}
    return cfg


def _items(row: dict, cfg: dict, backbone: str) -> int:
    """How many items a job processed: images, teacher trajectories, iterations or RDPO steps."""
    sec = cfg["backbones"][backbone]
    stage = stage_of(row)
    n_images = int(sec["sample"]["seeds"].split("-")[1]) + 1
    return {"teacher": int(sec["teacher"]["seeds"].split("-")[1]) + 1, "distill": sec["distill"]["iterations"],
            "rdpo": sec["rdpo"]["steps"], "sample": n_images, "evaluate": n_images * len(sec["metrics"])
            }.get(stage, 1)


def _projection(stage: str, per_item: float, full: dict, backbone: str, rows_full: int) -> float:
    """GPU-hours of the full paper study's share of ``stage`` from a per-item time: the backbone's ``paper_scale``
    counts (the config's own where a key is absent), every solver row, six metrics."""
    sec = full["backbones"][backbone]
    scale = paper_scale(sec)
    own = {"eval_prompts": len(parse_seeds(sec["sample"]["seeds"])),
           "teacher_seeds": len(parse_seeds(sec["teacher"]["seeds"])),
           "distill_iterations": sec["distill"]["iterations"], "rdpo_steps": sec["rdpo"]["steps"]}
    if stage == "report":
        return projected_hours(per_item, 1)
    key = PAPER_SCALE_KEYS[stage]
    per_run = scale.get(key) or own[key]
    rows = {"sample": rows_full, "evaluate": rows_full * len(METRICS)}.get(stage, 1)  # per row (and metric)
    return projected_hours(per_item, per_run * rows)


def aggregate(log_rows: list[dict], cfg: dict, full: dict, backbone: str, failed: set[str], gpu: str) -> list[dict]:
    """One row per stage from the jobs' resource lines."""
    from epd.config import study_rows

    sec = cfg["backbones"][backbone]
    rows_full = len(study_rows(full["backbones"][backbone]))
    out = []
    for stage in ("teacher", "distill", "rdpo", "sample", "evaluate", "report"):
        jobs = [r for r in log_rows if stage_of(r) == stage]
        wall = sum(r["wall_s"] for r in jobs)
        items = sum(_items(r, cfg, backbone) for r in jobs) or 1
        per_item = wall / items if jobs else None
        out.append({"backbone": sec["kind"], "study": backbone, "resolution": sec.get("resolution"), "stage": stage,
                    "ok": bool(jobs) and stage not in failed, "jobs": len(jobs), "wall_s": round(wall, 2),
                    "per_item_s": per_item, "items": items,
                    "peak_alloc_gib": max((r.get("peak_alloc_gib", 0.0) for r in jobs), default=None),
                    "peak_reserved_gib": max((r.get("peak_reserved_gib", 0.0) for r in jobs), default=None),
                    "gpu": gpu,
                    "projected_gpu_hours": _projection(stage, per_item, full, backbone, rows_full)
                    if per_item is not None else None})
    return out


def run(args) -> int:
    from epd.config import load_config

    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    full = load_config(args.config)
    counts = {**COUNTS, **{k: int(v) for k, v in (c.split("=", 1) for c in args.count)}}
    cfg = study_config(full, args.backbone, counts, f"sqlite:///{work}/mlflow.db")
    cfg_path = work / f"gpu_{args.backbone}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    res_log = Path(args.resource_log or work / "resources.jsonl").resolve()
    res_log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, EPD_RESOURCE_LOG=str(res_log), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    t0 = time.time()
    weights = args.weights or str(work / "weights")
    if not args.weights:
        family = full["backbones"][args.backbone]["kind"]
        subprocess.run(["epd", "weights", "fake", "--size", "full", "--backbones", family, "--out", weights,
                        "--force"], check=True, env=env)
    fake_s = time.time() - t0
    env["EPD_WEIGHTS_DIR"] = weights
    t0 = time.time()
    budget = max(30.0, args.budget_s - fake_s)
    cmd = [sys.executable, "-m", "snakemake", "--cores", "all", "--configfile", str(cfg_path), "--keep-going",
           "--scheduler", "greedy"] + (["--until", *args.until] if args.until else []) \
        + (["--resources", f"gpu={args.gpu_jobs}"] if args.gpu_jobs else [])
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:  # out of this call's time: finished stages are reported, the others not ok
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        rc = 124
    chain_s = time.time() - t0
    log_rows = [json.loads(line) for line in res_log.read_text().splitlines()] if res_log.exists() else []
    done = {stage_of(r) for r in log_rows}
    failed = set() if rc == 0 else {s for s in set(STAGES.values()) if s not in done}
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rows = aggregate(log_rows, cfg, full, args.backbone, failed, gpu)
    result = {"benchmark": "gpu_study", "config": args.config, "study": args.backbone, "counts": counts,
              "snakemake_rc": rc, "budget_s": args.budget_s, "fake_weights_s": round(fake_s, 1), "chain_s": round(chain_s, 1),
              "machine": {"gpu": gpu, "torch": torch.__version__, "python": platform.python_version(),
                          "cpu_count": os.cpu_count()},
              "projected_gpu_hours_total": sum(r["projected_gpu_hours"] or 0 for r in rows),
              "rows": rows, "jobs": log_rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "jobs")}, indent=1))
    for r in rows:
        print(r)
    return rc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="the backbone's study config (e.g. configs/sd15.yaml)")
    p.add_argument("--backbone", required=True, help="backbone name in that config")
    p.add_argument("--out", required=True, help="result JSON")
    p.add_argument("--workdir", default="/tmp/gpu_study")
    p.add_argument("--weights", default=None, help="existing fake/real weights root (skip generation)")
    p.add_argument("--resource-log", default=None, help="where jobs append their resource lines (default: workdir)")
    p.add_argument("--count", action="append", default=[], metavar="KEY=N",
                   help=f"override a scaled-down count ({', '.join(COUNTS)}); batch settings never change")
    p.add_argument("--until", nargs="+", default=None, metavar="RULE",
                   help="run the chain only up to these rules (snakemake --until), e.g. rdpo")
    p.add_argument("--gpu-jobs", type=int, default=None, metavar="G",
                   help="at most G GPU jobs at once (snakemake --resources gpu=G); default: no limit. FLUX needs 1: "
                        "two of its 12B-transformer jobs do not fit one 80 GB card together")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="wall-clock budget for weights + chain; stages not finished by then are reported not ok")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
