"""Rows from the original RLEPD system's result JSONs (``results/<prefix>_<metric>.json``).

Each file holds ``stats{count, mean, std (population), min, max}`` for one metric over one sample folder. The
prefix names the backbone and the sampler: ``flux_euler_20`` is a baseline (solver ``euler``, 20 steps),
anything else (``flux_epd_step001000``, ``sd15_k20_9000``) is an EPD export and becomes ``epd_<rest>``.

ImageReward in these files carries the original's ``+3·1.03334`` offset; rows are converted to the official
normalisation here and the cell is footnoted.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import EPDError
from ..metrics.stats import se_from_population_std
from ..rewards import IMAGEREWARD_RLEPD_OFFSET
from .tables import Cell, Row

__all__ = ["read_external", "parse_external_arg", "ORIGINAL_SOURCE", "IR_NOTE"]

ORIGINAL_SOURCE = "original RLEPD"
IR_MARK = "†"
IR_NOTE = (f"{IR_MARK} ImageReward from the original RLEPD result files, converted from its +3·1.03334 convention "
           f"to the official normalisation: value − {IMAGEREWARD_RLEPD_OFFSET:.5f}.")
# the original's metric file suffixes -> registry names
METRICS = {"hps": "hps", "pick": "pickscore", "pickscore": "pickscore", "imagereward": "imagereward", "clip": "clip",
           "aesthetic": "aesthetic", "mps": "mps"}
BACKBONES = ("sd3_1024", "sd3_512", "sd15", "flux")
BASELINES = ("euler", "ddim", "heun", "edm", "dpm2", "dpm", "dpmpp", "ipndm", "unipc")


def parse_external_arg(arg: str) -> tuple[str | None, Path]:
    """``DIR`` or ``BACKBONE=DIR`` (the backbone name overrides the one read from the file prefixes)."""
    head, sep, tail = arg.partition("=")
    if sep and head and "/" not in head:
        return head, Path(tail)
    return None, Path(arg)


def _split_prefix(prefix: str) -> tuple[str, str, float]:
    backbone = next((b for b in BACKBONES if prefix == b or prefix.startswith(b + "_")), prefix.split("_")[0])
    rest = prefix[len(backbone) + 1:]
    m = re.fullmatch(r"([a-z0-9]+?)_(\d+)", rest)
    if m and m.group(1) in BASELINES:
        return backbone, m.group(1), float(m.group(2))
    return backbone, rest if rest.startswith("epd") else f"epd_{rest}" if rest else "epd", float("nan")


def read_external(folder: str | Path, backbone: str | None = None) -> dict[str, list[Row]]:
    """Read one folder of original result JSONs into table rows.

    Args:
        folder (`str` or `Path`): a folder such as ``fixtures/rlepd/results/flux_baseline_eval_20260402``.
        backbone (`str`, *optional*): put every row under this backbone instead of the prefix's.

    Returns:
        `dict[str, list[Row]]`: backbone -> rows (``source`` = "original RLEPD", NFE unknown).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise EPDError(f"--external {folder}: not a folder of result JSONs")
    rows: dict[tuple[str, str, str], Row] = {}
    for path in sorted(folder.glob("*.json")):
        prefix, _, suffix = path.stem.rpartition("_")
        if suffix not in METRICS or not prefix:
            continue
        try:
            stats = json.loads(path.read_text())["stats"]
            mean, std, count = float(stats["mean"]), float(stats["std"]), int(stats["count"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise EPDError(f"result file {path}: expected stats{{count, mean, std}} "
                           f"({type(e).__name__}: {e})") from None
        bb, solver, steps = _split_prefix(prefix)
        bb = backbone or bb
        row = rows.setdefault((bb, solver, repr(steps)), Row(solver=solver, steps=steps, source=ORIGINAL_SOURCE))
        metric = METRICS[suffix]
        cell = Cell(mean, se_from_population_std(std, count), count)
        if metric == "imagereward":
            cell.mean -= IMAGEREWARD_RLEPD_OFFSET
            cell.note = IR_MARK
        row.cells[metric] = cell
    if not rows:
        raise EPDError(f"--external {folder}: no <prefix>_<metric>.json files with metric in {sorted(set(METRICS))}")
    out: dict[str, list[Row]] = {}
    for (bb, _, _), row in rows.items():
        out.setdefault(bb, []).append(row)
    return out
