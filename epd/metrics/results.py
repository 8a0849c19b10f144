"""Read metric result JSONs (the original RLEPD files and ours) into rows, and lay them out as tables.

The original scorers wrote one JSON per (run, metric): ``{images_dir, pattern, prompts_file, stats{count, mean, std
(population), min, max}, metadata{...}}`` named ``<prefix>_<metric>.json``, e.g. ``flux_dpm2_10_hps.json``,
``flux_epd_step001000_pick.json``, ``sd3_512_hps.json``. ``epd evaluate`` writes the same schema (plus ``se`` and
a ``metric`` field) as ``<out-dir>/<metric>.json``.

ImageReward conventions: the original files carry the RLEPD offset (official + 3 * 1.03334 = +3.1000). Rows are
converted to one convention, chosen by the named flag ``imagereward_convention`` (``"official"`` by default, the
registry's ``imagereward``; ``"rlepd"`` gives ``imagereward_rlepd`` values comparable with the original files).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from ..errors import EPDError
from ..io import read_json
from .stats import se_from_population_std

__all__ = ["read_result_json", "parse_result_name", "load_result_dir", "convert_imagereward", "results_table",
           "ORIGINAL_METRIC_NAMES"]

# metric suffix in the original file names -> registry name (the original ImageReward is the RLEPD convention)
ORIGINAL_METRIC_NAMES = {"hps": "hps", "pick": "pickscore", "pickscore": "pickscore",
                         "imagereward": "imagereward_rlepd", "clip": "clip", "aesthetic": "aesthetic", "mps": "mps"}
_BACKBONES = ("sd3_512", "sd3_1024", "sd15", "sd3", "flux")
_SOLVERS = ("dpm2", "edm", "heun", "euler", "ipndm", "ddim", "dpmpp", "dpmpp_2m", "unipc", "epd")


def _offset() -> float:
    from ..rewards import IMAGEREWARD_RLEPD_OFFSET

    return IMAGEREWARD_RLEPD_OFFSET


def convert_imagereward(value: float, from_convention: str, to_convention: str) -> float:
    """Convert an ImageReward value between ``"official"`` and ``"rlepd"`` (= official + 3 * 1.03334)."""
    for c in (from_convention, to_convention):
        if c not in ("official", "rlepd"):
            raise ValueError(f"ImageReward convention must be 'official' or 'rlepd', got {c!r}")
    if from_convention == to_convention:
        return float(value)
    return float(value) + (_offset() if to_convention == "rlepd" else -_offset())


def parse_result_name(path: str | os.PathLike) -> dict:
    """Parse the original result naming.

    Examples: ``flux_dpm2_10_hps.json`` -> backbone ``flux``, solver ``dpm2``, steps 10, metric ``hps``;
    ``flux_epd_step001000_mps.json`` -> solver ``epd``, rl_step 1000; ``sd3_512_hps.json`` -> backbone ``sd3_512``;
    ``sd15_k20_9000_hps.json`` -> solver ``epd``, variant ``k20``, rl_step 9000. The folder name
    (``flux_epd_step001000_eval``) fills in what the file name lacks.

    Returns:
        `dict`: ``label`` (file prefix), ``metric`` (registry name), ``metric_raw``, ``backbone``, ``solver``,
        ``steps``, ``rl_step``, ``variant`` (missing parts are None).
    """
    path = Path(path)
    stem = path.stem
    m = re.match(r"^(?:(?P<prefix>.*)_)?(?P<metric>hps|pickscore|pick|imagereward|clip|aesthetic|mps)$", stem)
    if not m:
        raise EPDError(f"{path}: cannot tell the metric from the file name (expected <prefix>_<metric>.json with "
                       f"metric one of {sorted(ORIGINAL_METRIC_NAMES)})")
    prefix = m.group("prefix") or ""
    out = {"label": prefix or path.parent.name, "metric_raw": m.group("metric"),
           "metric": ORIGINAL_METRIC_NAMES[m.group("metric")], "backbone": None, "solver": None, "steps": None,
           "rl_step": None, "variant": None}
    rest = prefix
    for bb in _BACKBONES:
        if rest == bb or rest.startswith(bb + "_"):
            out["backbone"], rest = bb, rest[len(bb) + 1:]
            break
    if (mm := re.fullmatch(r"epd_step(\d+)(?:_eval)?", rest)):
        out["solver"], out["rl_step"] = "epd", int(mm.group(1))
    elif (mm := re.fullmatch(r"(k\d+)_(\d+)", rest)):
        out["solver"], out["variant"], out["rl_step"] = "epd", mm.group(1), int(mm.group(2))
    elif (mm := re.fullmatch(r"([a-z0-9_]+?)_(\d+)", rest)) and mm.group(1) in _SOLVERS:
        out["solver"], out["steps"] = mm.group(1), int(mm.group(2))
    elif rest.isdigit():
        out["solver"], out["rl_step"] = "epd", int(rest)
    elif rest:
        out["variant"] = rest
    parent = re.fullmatch(r"(?P<bb>[a-z0-9]+)_epd_step(?P<step>\d+)_eval", path.parent.name)
    if parent and out["solver"] is None:
        out["solver"], out["rl_step"] = "epd", int(parent.group("step"))
    return out


def read_result_json(path: str | os.PathLike) -> dict:
    """Read and validate one result JSON (original schema; ours adds ``se`` and ``metric``).

    Returns:
        `dict`: the parsed JSON with ``stats`` checked (``count`` int >= 1; ``mean`` finite; ``std``/``min``/``max``
        numbers when present).
    """
    path = Path(path)
    obj = read_json(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("stats"), dict):
        raise EPDError(f"{path}: not a metric result file (no 'stats' object)")
    st = obj["stats"]
    count = st.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise EPDError(f"{path}: stats.count must be a positive integer, got {count!r}")
    for k in ("mean", "std", "min", "max", "se"):
        v = st.get(k)
        if k == "mean" and not isinstance(v, (int, float)):
            raise EPDError(f"{path}: stats.mean must be a number, got {v!r}")
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise EPDError(f"{path}: stats.{k} must be a number, got {v!r}")
    if not math.isfinite(st["mean"]):
        raise EPDError(f"{path}: stats.mean is not finite")
    return obj


def _row_from(path: Path, obj: dict) -> dict:
    st = obj["stats"]
    if "metric" in obj:  # written by `epd evaluate`
        md = obj.get("metadata", {})
        row = {"label": obj.get("label") or md.get("label") or path.parent.name, "metric": obj["metric"],
               "backbone": md.get("backbone"), "solver": md.get("solver"), "steps": md.get("steps"),
               "rl_step": md.get("rl_step"), "variant": None, "source": "epd"}
    else:
        row = parse_result_name(path)
        row.pop("metric_raw")
        row["source"] = "original"
    n, std = int(st["count"]), st.get("std")
    se = st.get("se")
    if se is None and std is not None:
        se = se_from_population_std(std, n)
    row.update(mean=float(st["mean"]), std=None if std is None else float(std), count=n,
               se=float("nan") if se is None else float(se), min=st.get("min"), max=st.get("max"), path=str(path))
    return row


def _convert_row(row: dict, convention: str) -> dict:
    target = "imagereward" if convention == "official" else "imagereward_rlepd"
    src = {"imagereward": "official", "imagereward_rlepd": "rlepd"}.get(row["metric"])
    if src is None or row["metric"] == target:
        return row
    conv = convention
    row = dict(row, metric=target, mean=convert_imagereward(row["mean"], src, conv))
    for k in ("min", "max"):
        if row.get(k) is not None:
            row[k] = convert_imagereward(row[k], src, conv)
    return row


def load_result_dir(path: str | os.PathLike, imagereward_convention: str = "official",
                    recursive: bool = True) -> list[dict]:
    """Read every result JSON under ``path`` into rows.

    Args:
        path: folder of result JSONs (the original ``results/...`` folders or an ``epd evaluate`` out-dir).
        imagereward_convention (`str`): ``"official"`` (rows named ``imagereward``) or ``"rlepd"``
            (``imagereward_rlepd``); every ImageReward row is converted to it.
        recursive (`bool`): include sub-folders.

    Returns:
        `list[dict]`: rows with ``label, backbone, solver, steps, rl_step, variant, metric, mean, std, count, se,
        min, max, source, path``. ``se`` = population std / sqrt(count - 1).
    """
    if imagereward_convention not in ("official", "rlepd"):
        raise ValueError(f"imagereward_convention must be 'official' or 'rlepd', got {imagereward_convention!r}")
    root = Path(path)
    if not root.is_dir():
        raise EPDError(f"results directory {root}: not found")
    files = sorted(root.rglob("*.json") if recursive else root.glob("*.json"))
    rows = []
    for f in files:
        if any(part.startswith(".") for part in f.relative_to(root).parts) or f.name == "summary.json":
            continue
        obj = read_json(f)
        if not isinstance(obj, dict) or "stats" not in obj:
            continue  # sidecars, manifests and other JSON files are not results
        rows.append(_convert_row(_row_from(f, read_result_json(f)), imagereward_convention))
    if not rows:
        raise EPDError(f"results directory {root}: no metric result JSONs found")
    return rows


def results_table(rows: list[dict], metrics: list[str] | None = None, digits: int = 4, with_se: bool = True,
                  label_key: str = "label") -> str:
    """A Markdown table: one line per run label, one column per metric, cells ``mean ± se``.

    Args:
        rows: rows from :func:`load_result_dir` (original files and ours can be mixed).
        metrics (`list[str]`, *optional*): column order (default: metrics in first-seen order).
        digits (`int`): decimals.
        with_se (`bool`): append ``± se`` where known.
        label_key (`str`): row field naming the table line.

    Returns:
        `str`: the table.
    """
    metrics = metrics or list(dict.fromkeys(r["metric"] for r in rows))
    labels = list(dict.fromkeys(r[label_key] for r in rows))
    cell = {}
    for r in rows:
        key = (r[label_key], r["metric"])
        if key in cell:
            raise EPDError(f"two results for {key}: {cell[key]['path']} and {r['path']}")
        cell[key] = r

    def fmt(r):
        if r is None:
            return "–"
        s = f"{r['mean']:.{digits}f}"
        if with_se and r.get("se") is not None and math.isfinite(r["se"]):
            s += f" ± {r['se']:.{digits}f}"
        return s

    lines = ["| run | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for lab in labels:
        lines.append(f"| {lab} | " + " | ".join(fmt(cell.get((lab, m))) for m in metrics) + " |")
    return "\n".join(lines) + "\n"
