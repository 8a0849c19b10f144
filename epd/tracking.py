"""MLflow helpers: one run per job, tagged with stage, backbone, rule, wildcards, git sha and input hashes.

Tracking is on when ``MLFLOW_TRACKING_URI`` is set (the Snakemake profile sets it to a SQLite file under
``results/``) or a ``tracking_uri`` is passed; otherwise every call is a no-op, so library code and tests never
need a server. Experiments are named ``epd/<stage>``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

__all__ = ["enabled", "start_run", "Run", "git_sha", "environment_tags"]


def enabled(tracking_uri: str | None = None) -> bool:
    return bool(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))


def git_sha() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        sha = out.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment_tags() -> dict[str, str]:
    import torch

    tags = {"git_sha": git_sha(), "python": platform.python_version(), "torch": torch.__version__,
            "host_platform": platform.platform()}
    for var in ("SNAKEMAKE_RULE", "SNAKEMAKE_WILDCARDS"):
        if os.environ.get(var):
            tags[var.lower()] = os.environ[var]
    return tags


def used_gpu() -> str:
    """The name of the CUDA device this process used, or "" when it never initialised CUDA."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return ""
    return torch.cuda.get_device_name(torch.cuda.current_device())


class Run:
    """Thin wrapper so callers need not care whether MLflow is on."""

    def __init__(self, mlflow_module=None):
        self._m = mlflow_module

    @property
    def active(self) -> bool:
        return self._m is not None

    @property
    def run_id(self) -> str | None:
        return self._m.active_run().info.run_id if self._m else None

    def params(self, params: dict[str, Any]) -> None:
        if self._m:
            flat = _flatten(params)
            self._m.log_params({k: (json.dumps(v) if isinstance(v, (list, dict)) else v)[:6000]
                                if isinstance(v, str) else v for k, v in flat.items()})

    def metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._m:
            clean = {k: float(v) for k, v in metrics.items() if v is not None}
            self._m.log_metrics(clean, step=step)

    def tags(self, tags: dict[str, Any]) -> None:
        if self._m:
            self._m.set_tags({k: str(v) for k, v in tags.items()})

    def artifact(self, path: str | os.PathLike) -> None:
        if self._m and Path(path).exists():
            self._m.log_artifact(str(path))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` between processes (POSIX ``flock``; a no-op where unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def start_run(stage: str, *, backbone: str | None = None, name: str | None = None, tags: dict | None = None,
              params: dict | None = None, tracking_uri: str | None = None) -> Iterator[Run]:
    """Open one MLflow run for a job (experiment ``epd/<stage>``), or a no-op :class:`Run` when tracking is off."""
    if not enabled(tracking_uri):
        yield Run(None)
        return
    import mlflow

    uri = tracking_uri or os.environ["MLFLOW_TRACKING_URI"]
    lock = contextlib.nullcontext()
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        db.parent.mkdir(parents=True, exist_ok=True)
        lock = _file_lock(db.with_name(db.name + ".lock"))
    with lock:  # parallel jobs on a fresh database would both run MLflow's schema migrations ("duplicate column")
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(f"epd/{stage}")
    all_tags = {"stage": stage, **environment_tags(), **({"backbone": backbone} if backbone else {}), **(tags or {})}
    with mlflow.start_run(run_name=name or stage, tags={k: str(v) for k, v in all_tags.items()}):
        run = Run(mlflow)
        if params:
            run.params(params)
        yield run
        if gpu := used_gpu():
            run.tags({"gpu": gpu})
