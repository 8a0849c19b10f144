"""``epd sample --gpus G`` on the lent GPUs: one process vs seed sharding vs point parallelism, same images?

Runs the real CLI three times on the embedded digits backbone (an EPD snapshot, so point parallelism has K points
to spread): ``--gpus 1``, ``--gpus G --parallel seeds``, ``--gpus G --parallel points``, all with ``--device cuda``.
Records wall time of each command (process start, rendezvous and model load included: the digits network is tiny,
so this is a functional check of the multi-process paths on real GPUs and NCCL, not a speed benchmark) and the
largest per-pixel difference of every multi-rank image from the one-process image.

Usage::

    python benchmarks/gpu_sample_ranks.py --weights results/digits/backbone \\
        --table results/digits/distill/nfe5/table.safetensors --out benchmarks/results/gpu_sample_ranks.json
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import machine_info  # noqa: E402

from epd.io import atomic_write_json  # noqa: E402


def _images(d: Path) -> dict:
    return {p.name: np.asarray(Image.open(p)).astype(int) for p in sorted(d.glob("*.png")) if p.stem.isdigit()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--backbone", default="digits")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--table", required=True)
    ap.add_argument("--seeds", default="0-255")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    base = [sys.executable, "-m", "epd.cli", "sample", "--config", args.config, "--backbone", args.backbone,
            "--weights", args.weights, "--predictor_path", args.table, "--seeds", args.seeds, "--batch", "64",
            "--device", "cuda"]
    rows, ref = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra in [("one_gpu", []), ("seeds", ["--gpus", str(args.gpus), "--parallel", "seeds"]),
                             ("points", ["--gpus", str(args.gpus), "--parallel", "points"])]:
            out = Path(tmp) / label
            t0 = time.time()
            proc = subprocess.run(base + ["--outdir", str(out)] + extra, cwd=ROOT, capture_output=True, text=True)
            row = {"mode": label, "gpus": 1 if label == "one_gpu" else args.gpus, "rc": proc.returncode,
                   "wall_s": round(time.time() - t0, 2)}
            if proc.returncode:
                row["error"] = proc.stderr[-2000:]
            else:
                imgs = _images(out)
                row["images"] = len(imgs)
                if ref is None:
                    ref = imgs
                else:
                    row["same_files"] = imgs.keys() == ref.keys()
                    row["max_abs_pixel_diff_vs_one_gpu"] = int(max(np.abs(imgs[k] - ref[k]).max() for k in ref))
                    row["identical_images"] = sum(bool((imgs[k] == ref[k]).all()) for k in ref)
            rows.append(row)
            print(row, flush=True)
    atomic_write_json(args.out, {"benchmark": "gpu_sample_ranks", "machine": machine_info(torch.device("cuda")),
                                 "seeds": args.seeds, "table": args.table, "rows": rows,
                                 "complete": all(r["rc"] == 0 for r in rows)})
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
