"""``epd backbone train``: train the embedded digits backbone (denoiser + independent classifier).

EDM training (Karras et al. 2022): log-normal noise levels, loss weight ``(sigma^2 + sigma_data^2) /
(sigma sigma_data)^2``, Adam with warm-up and cosine decay, EMA weights saved as the model. Every random draw of
step ``s`` comes from a generator seeded with ``(seed, s)``, so a run is deterministic on a CPU and a resumed run
reproduces an uninterrupted one exactly.

Outputs in ``--out DIR``: ``model.safetensors`` + ``model.json`` (EMA denoiser), ``classifier.safetensors`` +
``classifier.json``, ``train_log.jsonl``, ``resolved_config.yaml``; ``checkpoint.safetensors`` while training
(written atomically every ``checkpoint_every`` steps and on Ctrl-C / SIGTERM, picked up by the next run).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ...errors import ConfigError, EPDError
from ...io import atomic_path, atomic_write_text, config_hash
from ...progress import Heartbeat
from .classifier import DigitsClassifierConfig, load_classifier, save_classifier, train_classifier
from .data import NULL_CLASS, DigitsSplit, load_split
from .model import DEFAULT_ARCH, FORMAT, FORMAT_VERSION, SIGMA_DATA, build_net, load_model, save_model

__all__ = ["DigitsTrainConfig", "load_train_config", "train", "train_denoiser", "denoising_loss", "add_arguments",
           "run"]

log = logging.getLogger(__name__)
CKPT_FORMAT = "epd-digits-checkpoint"
# Options that change neither the model nor its training trajectory (excluded from the config hash).
_NOT_HASHED = ("checkpoint_every", "log_every", "eval_every", "classifier")


@dataclass
class DigitsTrainConfig:
    """Training budget and options (``backbones.digits.train`` in the YAML config; defaults are the default budget).

    Args:
        seed (`int`): training seed (initialisation, batches, noise, label dropout).
        split_seed (`int`), n_heldout (`int`), upsample (`int`): the data split (see :func:`load_split`).
        arch (`dict`): overrides of the U-Net architecture (:data:`~epd.backbones.digits.DEFAULT_ARCH`).
        steps (`int`): optimiser steps. batch_size (`int`): images per step.
        lr (`float`), warmup (`int`), lr_min_ratio (`float`): Adam learning rate, linear warm-up steps, cosine
            decay to ``lr * lr_min_ratio``.
        weight_decay (`float`): AdamW decoupled weight decay.
        ema_decay (`float`): EMA decay of the saved weights (ramped up over the first steps).
        p_mean (`float`), p_std (`float`): log-normal noise-level distribution.
        label_dropout (`float`): probability of training a sample with the null class (enables CFG).
        grad_clip (`float`): gradient-norm clip (0 disables).
        checkpoint_every (`int`), log_every (`int`), eval_every (`int`): cadences in steps.
        classifier (`dict`): options of :class:`~epd.backbones.digits.classifier.DigitsClassifierConfig`.
    """

    seed: int = 0
    split_seed: int = 0
    n_heldout: int = 297
    upsample: int = 1
    arch: dict = field(default_factory=dict)
    steps: int = 2500
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 100
    lr_min_ratio: float = 0.1
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    p_mean: float = -1.2
    p_std: float = 1.2
    label_dropout: float = 0.1
    grad_clip: float = 1.0
    checkpoint_every: int = 250
    log_every: int = 50
    eval_every: int = 500
    classifier: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("steps", "batch_size", "checkpoint_every", "log_every", "eval_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"backbones.digits.train.{name}: expected a positive integer, got {v!r}")
        if not 0 <= self.label_dropout < 1:
            raise ConfigError(f"backbones.digits.train.label_dropout: expected a value in [0, 1), got {self.label_dropout}")
        if not isinstance(self.arch, dict):
            raise ConfigError(f"backbones.digits.train.arch: expected a mapping, got {self.arch!r}")
        unknown = set(self.arch) - set(DEFAULT_ARCH)
        if unknown:
            raise ConfigError(f"backbones.digits.train.arch.{sorted(unknown)[0]}: unknown key; known: "
                              f"{sorted(DEFAULT_ARCH)}")
        res = 8 * self.upsample if isinstance(self.upsample, int) else None
        if "resolution" in self.arch and self.arch["resolution"] != res:
            raise ConfigError(f"backbones.digits.train.arch.resolution: {self.arch['resolution']} contradicts "
                              f"upsample {self.upsample} (8 x upsample = {res}); leave it out")
        DigitsClassifierConfig.from_dict(self.classifier, "backbones.digits.train.classifier")

    @property
    def full_arch(self) -> dict:
        return {**DEFAULT_ARCH, **self.arch, "resolution": 8 * self.upsample}

    @property
    def classifier_config(self) -> DigitsClassifierConfig:
        return DigitsClassifierConfig.from_dict(self.classifier)

    def hash(self) -> str:
        d = {k: v for k, v in asdict(self).items() if k not in _NOT_HASHED}
        return config_hash({**d, "arch": self.full_arch})

    @classmethod
    def from_dict(cls, d: dict | None) -> "DigitsTrainConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        for k in d:
            if k not in known:
                raise ConfigError(f"backbones.digits.train.{k}: unknown key; known: {sorted(known)}")
        return cls(**d)


def load_train_config(path: str | os.PathLike, backbone: str = "digits") -> DigitsTrainConfig:
    """Read ``backbones.<backbone>.train`` of a YAML workflow config (missing ``train`` gives the defaults)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: file not found")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({e})") from None
    section = (config.get("backbones") or {}).get(backbone) if isinstance(config, dict) else None
    if not isinstance(section, dict):
        raise ConfigError(f"--config {path}: no 'backbones.{backbone}' section")
    kind = section.get("kind", backbone)
    if kind != "digits":
        raise ConfigError(f"{path}: backbones.{backbone}.kind is {kind!r}; `epd backbone train` trains only the "
                          "embedded 'digits' backbone")
    return DigitsTrainConfig.from_dict(section.get("train"))


# --------------------------------------------------------------------------------------------------------------
# One training step and the evaluation loss.

def _step_seed(seed: int, step: int) -> int:
    return (int(seed) * 1_000_003 + int(step)) % (2**63)


def _lr_at(cfg: DigitsTrainConfig, step: int) -> float:
    warm = min(1.0, (step + 1) / max(cfg.warmup, 1))
    cos = cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
    return cfg.lr * warm * cos


def _edm_weight(sigma: torch.Tensor) -> torch.Tensor:
    return (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2


def _train_step(net, opt, split: DigitsSplit, cfg: DigitsTrainConfig, step: int) -> float:
    seed = _step_seed(cfg.seed, step)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # network dropout
    idx = torch.randperm(len(split.x_train), generator=g)[: cfg.batch_size]
    x0, y = split.x_train[idx], split.y_train[idx].clone()
    y[torch.rand(len(idx), generator=g) < cfg.label_dropout] = NULL_CLASS
    sigma = (torch.randn(len(idx), generator=g) * cfg.p_std + cfg.p_mean).exp()
    noise = torch.randn(x0.shape, generator=g) * sigma.view(-1, 1, 1, 1)
    for group in opt.param_groups:
        group["lr"] = _lr_at(cfg, step)
    loss = (_edm_weight(sigma).view(-1, 1, 1, 1) * (net(x0 + noise, sigma, y) - x0) ** 2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
    opt.step()
    return float(loss.detach())


@torch.no_grad()
def _ema_update(ema, net, decay: float) -> None:
    for pe, p in zip(ema.parameters(), net.parameters()):
        pe.lerp_(p, 1 - decay)


@torch.no_grad()
def denoising_loss(net, x: torch.Tensor, y: torch.Tensor, p_mean: float = -1.2, p_std: float = 1.2,
                   n_sigmas: int = 8, seed: int = 12345, batch_size: int = 1024) -> float:
    """Expected EDM training loss of ``net`` (eval mode) on images ``x`` with labels ``y``.

    The log-normal noise distribution is replaced by ``n_sigmas`` equal-probability quantiles and the noise by a
    fixed seed, so train and held-out losses are computed identically and are comparable.
    """
    was_training = net.training
    net.eval()
    q = (torch.arange(n_sigmas, dtype=torch.float64) + 0.5) / n_sigmas
    sigmas = torch.exp(p_mean + p_std * torch.special.ndtri(q)).float()
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for s in sigmas:
        noise = torch.randn(x.shape, generator=g) * s
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            err = (net(xb + noise[i:i + batch_size], s.expand(len(xb)), yb) - xb) ** 2
            total += float(_edm_weight(s) * err.sum())
    net.train(was_training)
    return total / (n_sigmas * x.numel())


# --------------------------------------------------------------------------------------------------------------
# Checkpoints.

def _save_checkpoint(path: Path, net, ema, opt, step: int, elapsed: float, chash: str,
                     pending_losses: list[float]) -> None:
    from safetensors.torch import save_file

    tensors = {f"net.{k}": v.detach().clone() for k, v in net.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().clone() for k, v in ema.state_dict().items()})
    sd = opt.state_dict()
    for i, st in sd["state"].items():
        for name, v in st.items():
            tensors[f"opt.{i}.{name}"] = torch.as_tensor(v).detach().clone()
    state = {"step": step, "elapsed_s": elapsed, "config_hash": chash, "param_groups": sd["param_groups"],
             "pending_losses": pending_losses}
    with atomic_path(path, ".safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": CKPT_FORMAT, "state": json.dumps(state)})


def _load_checkpoint(path: Path, net, ema, opt, chash: str) -> tuple[int, float, list[float]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise EPDError(f"{path}: cannot read the training checkpoint ({e}); delete it to restart training") from None
    if meta.get("format") != CKPT_FORMAT:
        raise EPDError(f"{path}: not a digits training checkpoint (format {meta.get('format')!r}); delete it")
    state = json.loads(meta["state"])
    if state["config_hash"] != chash:
        raise EPDError(f"{path}: written for a different training config (hash {state['config_hash']} vs "
                       f"{chash}); rerun with the original config or delete the checkpoint to start over")
    try:
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        opt_state: dict = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, i, name = k.split(".", 2)
                opt_state.setdefault(int(i), {})[name] = v
        opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    except (RuntimeError, KeyError, ValueError) as e:
        raise EPDError(f"{path}: does not match the model being trained ({e}); delete it to start over") from None
    return int(state["step"]), float(state["elapsed_s"]), list(state["pending_losses"])


class _StopFlag:
    """SIGINT/SIGTERM set a flag checked between steps (so a checkpoint is never taken mid-update)."""

    def __init__(self):
        self.stop = False
        self._old = {}

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread: no handlers, no graceful stop
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.stop:  # second signal: give up immediately
            raise KeyboardInterrupt
        self.stop = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# --------------------------------------------------------------------------------------------------------------
# Training.

def _read_log(path: Path, upto: int) -> list[dict]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("step", 0) <= upto]


def _model_up_to_date(out_dir: Path, chash: str) -> bool:
    try:
        js = json.loads((out_dir / "model.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return js.get("train_hash") == chash and (out_dir / "model.safetensors").is_file()


@dataclass
class _Run:
    """What a (possibly resumed) denoiser training run carries from step to step."""

    net: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    ckpt: Path
    log_path: Path
    chash: str
    start: int = 0
    elapsed: float = 0.0
    losses: list = field(default_factory=list)  # since the last log row (kept across a resume)


def _start_run(cfg: DigitsTrainConfig, out_dir: Path, chash: str) -> _Run:
    """Seeded network, EMA copy and optimiser; state and log rows of ``checkpoint.safetensors`` when present."""
    torch.manual_seed(cfg.seed)
    net = build_net(cfg.full_arch)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    run = _Run(net, ema, opt, out_dir / "checkpoint.safetensors", out_dir / "train_log.jsonl", chash)
    if run.ckpt.is_file():
        run.start, run.elapsed, run.losses = _load_checkpoint(run.ckpt, net, ema, opt, chash)
        log.info("resuming from %s at step %d", run.ckpt, run.start)
    rows = _read_log(run.log_path, run.start)
    atomic_write_text(run.log_path, "".join(json.dumps(r) + "\n" for r in rows))
    return run


def _log_row(run: _Run, cfg: DigitsTrainConfig, split: DigitsSplit, step: int, t0: float) -> dict:
    """The ``train_log.jsonl`` row after ``step + 1`` steps (EMA train/held-out losses every ``eval_every``)."""
    done = step + 1
    row = {"step": done, "loss": sum(run.losses) / len(run.losses), "lr": _lr_at(cfg, step),
           "elapsed_s": round(time.perf_counter() - t0, 3)}
    if done % cfg.eval_every == 0 or done == cfg.steps:
        n_eval = min(len(split.x_heldout), len(split.x_train))
        row["ema_train_loss"] = denoising_loss(run.ema, split.x_train[:n_eval], split.y_train[:n_eval],
                                               cfg.p_mean, cfg.p_std, n_sigmas=4)
        row["ema_heldout_loss"] = denoising_loss(run.ema, split.x_heldout[:n_eval], split.y_heldout[:n_eval],
                                                 cfg.p_mean, cfg.p_std, n_sigmas=4)
    return row


def _run_steps(run: _Run, cfg: DigitsTrainConfig, split: DigitsSplit, progress: bool,
               stop_after: int | None) -> float | None:
    """Steps ``run.start .. cfg.steps``; the training seconds when finished, None when stopped early."""
    from tqdm.auto import tqdm

    run.net.train()
    t0 = time.perf_counter() - run.elapsed
    beat = Heartbeat("digits denoiser", cfg.steps, run.start, logger=log)
    with _StopFlag() as flag, open(run.log_path, "a") as flog, \
            tqdm(total=cfg.steps, initial=run.start, disable=None if progress else True, desc="digits denoiser",
                 unit="step") as bar:
        for step in range(run.start, cfg.steps):
            run.losses.append(_train_step(run.net, run.opt, split, cfg, step))
            _ema_update(run.ema, run.net, min(cfg.ema_decay, (1 + step) / (10 + step)))
            done = step + 1
            bar.update(1)
            beat(done, loss=run.losses[-1])
            if done % cfg.log_every == 0 or done == cfg.steps:
                row = _log_row(run, cfg, split, step, t0)
                flog.write(json.dumps(row) + "\n")
                flog.flush()
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                run.losses = []
            interrupted = flag.stop or (stop_after is not None and done >= stop_after)
            if done < cfg.steps and (done % cfg.checkpoint_every == 0 or interrupted):
                _save_checkpoint(run.ckpt, run.net, run.ema, run.opt, done, time.perf_counter() - t0, run.chash,
                                 run.losses)
            if interrupted and done < cfg.steps:
                if flag.stop:
                    raise EPDError(f"training interrupted at step {done}/{cfg.steps}; checkpoint saved to "
                                   f"{run.ckpt} — rerun the same command to resume")
                return None
    return time.perf_counter() - t0


def _save_trained(run: _Run, cfg: DigitsTrainConfig, out_dir: Path, elapsed: float) -> dict:
    """Write the EMA model with its metadata, drop the checkpoint; the ``model.json`` content."""
    rows = _read_log(run.log_path, cfg.steps)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "arch": cfg.full_arch,
            "data": {"split_seed": cfg.split_seed, "n_heldout": cfg.n_heldout, "upsample": cfg.upsample},
            "train": asdict(cfg), "train_hash": run.chash, "steps": cfg.steps, "train_seconds": round(elapsed, 2),
            "final_log": rows[-1] if rows else None,
            "torch": torch.__version__, "num_params": sum(p.numel() for p in run.ema.parameters())}
    save_model(out_dir, run.ema, meta)
    run.ckpt.unlink(missing_ok=True)
    return json.loads((out_dir / "model.json").read_text())


def train_denoiser(cfg: DigitsTrainConfig, split: DigitsSplit, out_dir: str | os.PathLike, *, progress: bool = True,
                   stop_after: int | None = None) -> dict | None:
    """Train the EMA denoiser into ``out_dir``; resumes from ``out_dir/checkpoint.safetensors`` when present.

    Args:
        cfg (:class:`DigitsTrainConfig`): the training config.
        split (:class:`DigitsSplit`): the data.
        out_dir: output folder.
        progress (`bool`): show a tqdm progress bar (only on a terminal).
        stop_after (`int`, *optional*): stop (with a checkpoint) once this many steps are done — an interruption
            that tests and the resume logic share.

    Returns:
        The ``model.json`` content, or ``None`` when stopped early.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chash = cfg.hash()
    if _model_up_to_date(out_dir, chash):
        log.info("%s: model is up to date for this config; nothing to train", out_dir / "model.safetensors")
        return json.loads((out_dir / "model.json").read_text())
    run = _start_run(cfg, out_dir, chash)
    elapsed = _run_steps(run, cfg, split, progress, stop_after)
    return None if elapsed is None else _save_trained(run, cfg, out_dir, elapsed)


def _classifier_up_to_date(out_dir: Path, ccfg: DigitsClassifierConfig, data: dict) -> bool:
    try:
        _, meta = load_classifier(out_dir)
    except EPDError:
        return False
    return meta.get("train") == asdict(ccfg) and meta.get("data") == data


def train(cfg: DigitsTrainConfig, out_dir: str | os.PathLike, *, progress: bool = True,
          stop_after: int | None = None) -> dict:
    """Train the classifier (if missing or stale) and the denoiser (resuming) into ``out_dir``.

    Returns:
        A summary: seconds spent on each part, classifier accuracies, final losses, and whether training finished.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    import yaml

    atomic_write_text(out_dir / "resolved_config.yaml",
                      yaml.safe_dump({"backbones": {"digits": {"kind": "digits", "train": asdict(cfg)}}},
                                     sort_keys=False))
    split = load_split(cfg.split_seed, cfg.n_heldout, cfg.upsample)
    data = {"split_seed": cfg.split_seed, "n_heldout": cfg.n_heldout}
    ccfg = cfg.classifier_config
    summary: dict = {}
    t = time.perf_counter()
    if not _classifier_up_to_date(out_dir, ccfg, data):
        clf, stats = train_classifier(split, ccfg)
        save_classifier(out_dir, clf, ccfg, {"data": data, **stats})
    _, cmeta = load_classifier(out_dir)
    summary["classifier_seconds"] = time.perf_counter() - t
    summary["classifier_heldout_accuracy"] = cmeta["heldout_accuracy"]
    t = time.perf_counter()
    meta = train_denoiser(cfg, split, out_dir, progress=progress, stop_after=stop_after)
    summary["denoiser_seconds"] = time.perf_counter() - t
    summary["finished"] = meta is not None
    if meta is not None:
        summary["denoiser_train_seconds"] = meta["train_seconds"]
        summary["final_log"] = meta["final_log"]
        _log_mlflow(cfg, out_dir, summary)
    return summary


def _log_mlflow(cfg: DigitsTrainConfig, out_dir: Path, summary: dict) -> bool:
    """Log params, the loss curve and the model JSON to MLflow when ``MLFLOW_TRACKING_URI`` is set."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        return False
    import mlflow

    params = {k: v for k, v in asdict(cfg).items() if k not in ("arch", "classifier")}
    params.update({f"arch.{k}": v for k, v in cfg.full_arch.items()})
    params.update({f"classifier.{k}": v for k, v in asdict(cfg.classifier_config).items()})
    mlflow.set_experiment("epd/backbone")
    with mlflow.start_run(run_name="digits-train"):
        mlflow.set_tags({"stage": "backbone", "backbone": "digits", "config_hash": cfg.hash()})
        mlflow.log_params(params)
        for row in _read_log(out_dir / "train_log.jsonl", cfg.steps):
            mlflow.log_metrics({k: v for k, v in row.items() if k not in ("step", "elapsed_s")}, step=row["step"])
        mlflow.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float))})
        mlflow.log_artifact(str(out_dir / "model.json"))
    return True


# --------------------------------------------------------------------------------------------------------------
# CLI.

def add_arguments(p) -> None:
    p.add_argument("--config", required=True, help="workflow YAML; reads backbones.<backbone>.train")
    p.add_argument("--backbone", default="digits", help="config key under 'backbones' (kind must be digits)")
    p.add_argument("--out", required=True, help="output folder (resumes from its checkpoint when present)")
    p.add_argument("--steps", type=int, default=None, help="override the number of denoiser training steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    cfg = load_train_config(args.config, args.backbone)
    if args.steps is not None:
        cfg = DigitsTrainConfig.from_dict({**asdict(cfg), "steps": args.steps})
    summary = train(cfg, args.out, progress=not args.no_progress)
    print(json.dumps({k: v for k, v in summary.items() if k != "final_log"}, indent=2))
    load_model(args.out)  # fail loudly if what we wrote does not load
    return 0
