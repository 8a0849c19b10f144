"""Start-up time of the light `epd` commands (issue 22: <= 1 s wall, median of 5, on a 2-core machine).

Each command runs ``--repeats`` times as a fresh ``python -m epd.cli`` process (wall clock, median reported), and
once under ``python -X importtime`` (the cumulative import time of ``epd.cli`` and of the command's module, and
the slowest imports), which is what to read on a machine shared with other work: wall time there includes waiting
for a core, import time much less so. Writes one JSON file (machine, load average before/after, rows).

    python benchmarks/cli_startup.py --out benchmarks/results/cli_startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TABLE = ROOT / "data/original/exps/best_models/sd15/sd15-best.pkl"


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def _wall(argv: list[str], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "epd.cli", *argv], cwd=ROOT, env=_env(), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out.append(time.perf_counter() - t0)
    return out


def _importtime(argv: list[str]) -> dict:
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "epd.cli", *argv], cwd=ROOT, env=_env(),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rows = []  # (name with its nesting indent, cumulative us)
    for line in r.stderr.splitlines():
        if line.startswith("import time:") and "self [us]" not in line:
            _, cum, name = line[len("import time:"):].split("|", 2)
            rows.append((name[1:], int(cum)))
    top_level = [(n.strip(), cum) for n, cum in rows if not n.startswith(" ")]
    return {"total_import_s": round(sum(c for _, c in top_level) / 1e6, 4),
            "slowest": [{"module": n, "cumulative_s": round(c / 1e6, 4)} for n, c in
                        sorted(top_level, key=lambda x: -x[1])[:8]],
            "heavy_imported": sorted({n.strip().split(".")[0] for n, _ in rows}
                                     & {"torch", "diffusers", "transformers", "mlflow", "open_clip", "matplotlib"})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--table", default=str(DEFAULT_TABLE),
                    help="the released table `predictor show` reads (default: data/original/exps/best_models/sd15/"
                         "sd15-best.pkl, from `epd assets fetch`)")
    ap.add_argument("--repeats", type=int, default=5, help="fresh processes per command (median reported)")
    args = ap.parse_args(argv)
    commands = {"epd --help": ["--help"], "epd predictor show": ["predictor", "show", args.table],
                "epd metrics list": ["metrics", "list"]}
    load_before = os.getloadavg()
    rows = []
    for name, cmd in commands.items():
        walls = _wall(cmd, args.repeats)
        rows.append({"command": name, "argv": cmd, "wall_s": [round(w, 4) for w in walls],
                     "median_wall_s": round(statistics.median(walls), 4), "target_s": 1.0,
                     "meets_target": statistics.median(walls) <= 1.0, **_importtime(cmd)})
        print(f"{name}: median {rows[-1]['median_wall_s']:.3f} s wall, imports {rows[-1]['total_import_s']:.3f} s")
    doc = {"benchmark": "cli_startup", "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor(),
                                                   "platform": platform.platform(),
                                                   "python": platform.python_version(),
                                                   "loadavg_1_5_15_before": [round(v, 2) for v in load_before],
                                                   "loadavg_1_5_15_after": [round(v, 2) for v in os.getloadavg()]},
           "repeats": args.repeats, "rows": rows, "complete": True}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
