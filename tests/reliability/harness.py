"""Helpers of the reliability suite: the workspace (config, weights, tables), the five stages as CLI command
lines, progress probes, the "every visible file is complete" check and output comparison."""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import yaml

PROMPTS_GMM = ["0", "1"]
TIMING_KEYS = {"seconds", "seconds_per_image", "duration", "elapsed_sec", "elapsed_s", "train_seconds", "denoiser_train_seconds"}
TINY_DIGITS = {"steps": 6, "batch_size": 16, "checkpoint_every": 3, "log_every": 3, "eval_every": 6, "warmup": 2,
               "arch": {"channels": 8, "emb_dim": 16}, "classifier": {"steps": 20, "hidden": [16, 8]}}


# ---------------------------------------------------------------------------------------------- workspace
@dataclass
class Workspace:
    root: Path
    config: Path
    gmm_prompts: Path
    digits: Path  # trained backbone folder (model + classifier)
    init_table: Path  # RDPO start table for the digits backbone
    ref_seconds: dict = field(default_factory=dict)

    @classmethod
    def create(cls, root: Path) -> "Workspace":
        from epd.backbones.digits.train import DigitsTrainConfig, train
        from epd.predictor import save
        from epd.table import uniform_table

        prompts = root / "gmm_prompts.txt"
        prompts.write_text("\n".join(PROMPTS_GMM) + "\n")
        digits = root / "digits"
        train(DigitsTrainConfig.from_dict(TINY_DIGITS), digits, progress=False)
        init = save(uniform_table(4, 2, meta={"backbone": "digits", "afs": True}), root / "init")
        config = root / "config.yaml"
        config.write_text(yaml.safe_dump(base_config(prompts), sort_keys=False))
        return cls(root, config, prompts, digits, init)


def base_config(gmm_prompts: Path) -> dict:
    """A GMM backbone ``g`` (teacher, distillation) and a digits backbone ``d`` (RDPO, sampling, evaluation),
    sized so that each stage runs for a few seconds on one CPU thread."""
    return {"backbones": {
        "g": {"kind": "gmm", "guidance": 2.0, "solvers": ["euler"], "nfes": [5], "metrics": ["rmse_vs_teacher"],
              "prompts": {"train": str(gmm_prompts), "eval": str(gmm_prompts)},
              "student": {"num_points": 2, "afs": True, "scale_dir": 0.05},
              "teacher": {"solver": "heun", "M": 19, "seeds": "0-7679", "batch": 256},
              "distill": {"iterations": 60, "batch": 256, "save_every": 10}},
        "d": {"kind": "digits", "guidance": 1.5, "solvers": ["euler"], "nfes": [10], "metrics": ["digits_alignment"],
              "prompts": {"train": "builtin:digits", "eval": "builtin:digits"},
              "student": {"num_points": 2, "afs": True, "schedule": "edm"},
              "rdpo": {"rollout_batch_size": 4, "rloo_k": 2, "minibatch_size": 2, "steps": 24, "save_interval": 2,
                       "eval_interval": 4, "rewards": {"digits_alignment": 1.0}, "eval": {"seeds": "50000-50007"}}},
    }}


# ---------------------------------------------------------------------------------------------- stages
@dataclass
class Stage:
    """One CLI stage: its command line for an output folder, the stages whose reference outputs it reads, its save
    interval in progress units (the work a kill may cost) and the total progress of a run."""

    name: str
    argv: Callable  # (ws, out, refs) -> list
    needs: tuple = ()
    unit: str = "batch"
    save_interval: int = 1
    total: int = 0


STAGES = {
    "teacher": Stage("teacher", lambda ws, out, refs: [
        "teacher", "--config", ws.config, "--backbone", "g", "--nfe", "5", "--out", out],
        unit="shard of 256 trajectories", total=30),
    "distill": Stage("distill", lambda ws, out, refs: [
        "distill", "--config", ws.config, "--backbone", "g", "--nfe", "5", "--teacher", refs["teacher"], "--out", out],
        needs=("teacher",), unit="iteration", save_interval=10, total=60),
    "rdpo": Stage("rdpo", lambda ws, out, refs: [
        "rdpo", "--config", ws.config, "--backbone", "d", "--weights", ws.digits, "--init", ws.init_table,
        "--out", out], unit="PPO step", save_interval=2, total=24),
    "sample": Stage("sample", lambda ws, out, refs: [
        "sample", "--config", ws.config, "--backbone", "d", "--weights", ws.digits, "--solver", "euler", "--nfe", "10",
        "--seeds", "0-159", "--batch", "8", "--outdir", out], unit="batch of 8 images", total=160),
    "evaluate": Stage("evaluate", lambda ws, out, refs: [
        "evaluate", "--images", refs["sample"], "--metrics", "digits_alignment", "digits_accuracy", "digits_realism",
        "--weights-dir", ws.digits, "--out-dir", out, "--device", "cpu", "--batch-size", "16"],
        needs=("sample",), unit="whole evaluation"),
}

_TQDM = re.compile(r"(\d+)/(\d+) \[")


def tqdm_counts(stderr: str) -> list[int]:
    """Every ``n`` of ``n/total [`` printed by a progress bar, in order."""
    return [int(m.group(1)) for m in _TQDM.finditer(stderr)]


def finished_images(out: Path) -> int:
    """Images with their sidecar under their final names."""
    return sum(1 for p in out.glob("[0-9]*.json") if p.with_suffix(".png").exists()) if out.is_dir() else 0


def resume_point(stage: str, out: Path) -> int:
    """Where a rerun continues from, read from what is on disk (units of the stage's progress count)."""
    if stage == "teacher":
        return len(list(out.glob("shard-*.safetensors")))
    if stage == "distill":
        ck = out / "checkpoint.pt"
        return int(torch.load(ck, weights_only=True)["iteration"]) if ck.exists() else 0
    if stage == "rdpo":
        ck = out / "checkpoints" / "trainer-state.pt"
        return int(torch.load(ck, weights_only=True)["step"]) if ck.exists() else 0
    if stage == "sample":
        return finished_images(out)
    return 0


# ---------------------------------------------------------------------------------------------- integrity
def visible_files(root: Path) -> list[Path]:
    """Files under their final names (temporary files of atomic writes start with '.')."""
    return sorted(p for p in root.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def hidden_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob(".*") if p.is_file())


def check_complete(root: Path) -> list[str]:
    """Parse every visible file completely; return the problems (empty when every file is whole).

    Snapshot pairs (``X.safetensors`` + ``X.json``) must load together, or be refused as a mismatched pair
    (the state right after a kill between their two writes; the rerun rewrites both).
    """
    from PIL import Image
    from safetensors.torch import load_file

    from epd.errors import EPDError
    from epd.predictor import load as load_table

    problems = []
    for p in visible_files(root):
        try:
            if p.suffix == ".safetensors":
                load_file(str(p))
            elif p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix == ".jsonl":
                for line in p.read_text().splitlines():
                    json.loads(line)
                if p.stat().st_size and not p.read_text().endswith("\n"):
                    raise ValueError("last line is not terminated")
            elif p.suffix == ".png":
                with Image.open(p) as im:
                    im.load()
            elif p.suffix == ".pt":
                torch.load(p, weights_only=True)
            elif p.suffix == ".csv":
                rows = list(csv.reader(io.StringIO(p.read_text())))
                if not rows or any(len(r) != len(rows[0]) for r in rows):
                    raise ValueError("ragged or empty CSV")
            elif p.suffix == ".yaml":
                yaml.safe_load(p.read_text())
            elif p.suffix in (".stdout", ".stderr"):
                pass
            else:
                raise ValueError("unexpected file type")
        except Exception as e:  # noqa: BLE001
            problems.append(f"{p.relative_to(root)}: {type(e).__name__}: {e}")
    for st in root.rglob("table*.safetensors"):
        if st.with_suffix(".json").exists():
            try:
                load_table(st)
            except EPDError as e:
                if "does not belong to" not in str(e):
                    problems.append(f"{st.relative_to(root)}: {e}")
    return problems


# ---------------------------------------------------------------------------------------------- comparison
def _norm(obj, out: str):
    if isinstance(obj, dict):
        return {k: _norm(v, out) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [_norm(v, out) for v in obj]
    if isinstance(obj, str):
        return obj.replace(out, "<OUT>")
    return obj


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        return ("tensor", str(obj.dtype), tuple(obj.shape), obj.contiguous().numpy().tobytes())
    if isinstance(obj, dict):
        return {k: _tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_tensors(v) for v in obj]
    return obj


def canon(root: Path) -> dict[str, object]:
    """Comparable content of every visible output file: bytes for images, tensors, CSV; parsed JSON/JSONL without
    timing fields and with the folder's own path replaced; loaded tensors for ``.pt``."""
    out = str(root.resolve())
    res = {}
    for p in visible_files(root):
        rel = p.relative_to(root).as_posix()
        if p.suffix in (".stdout", ".stderr"):
            continue
        if p.suffix == ".json":
            res[rel] = _norm(json.loads(p.read_text()), out)
        elif p.suffix == ".jsonl":
            res[rel] = [_norm(json.loads(line), out) for line in p.read_text().splitlines()]
        elif p.suffix == ".yaml":
            res[rel] = p.read_text().replace(out, "<OUT>")
        elif p.suffix == ".pt":
            res[rel] = _tensors(torch.load(p, weights_only=True))
        else:
            res[rel] = p.read_bytes()
    return res


def diff(a: dict, b: dict) -> list[str]:
    """Names of files that differ between two :func:`canon` results."""
    names = sorted(set(a) | set(b))
    return [n for n in names if a.get(n) != b.get(n)]
