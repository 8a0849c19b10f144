"""``epd distill``: Stage 1 — learn an EPD table by matching teacher states along the student's own trajectory.

For every coarse step ``n`` the student takes one EPD step from its own previous state (the first from the
teacher's initial noise) and is compared with the teacher state at ``sigma_{n+1}`` (spec §4.3). The loss is the
sum over steps of the per-step mean squared error (``final_weight`` scales the last step); gradients flow
through the whole chain unless ``detach_between_steps``. Adam with the original's defaults (betas 0.9/0.999,
eps 1e-8), optional cosine schedule. Checkpoints hold parameters, optimizer, RNG state and iteration, so a
killed run resumes to the same result as an uninterrupted one.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .config import dataclass_from_dict
from .errors import ConfigError, EPDError, NonFiniteError
from .io import atomic_write_bytes, atomic_write_text, config_hash, load_error_text
from .memory import out_of_memory_names
from .predictor import save
from .solvers.epd import sample_epd
from .table import EPDTable, uniform_table

log = logging.getLogger(__name__)

__all__ = ["EPDParameters", "DistillConfig", "distill"]


class EPDParameters(nn.Module):
    """Unconstrained parameters of an EPD table.

    ``positions = cumsum(softmax(seg_logits))[:K]`` (strictly increasing, in (0, 1)), ``weights =
    softmax(w_logits)``, scales ``c = 1 - s + 2 s sigmoid(raw)`` for a range ``s > 0`` (``raw = 0`` gives 1).
    """

    def __init__(self, table: EPDTable, scale_dir: float = 0.0, scale_time: float = 0.0):
        super().__init__()
        self.meta = dict(table.meta)
        self.seg_logits = nn.Parameter(torch.log(table.segments()).float())
        self.w_logits = nn.Parameter(torch.log(table.weights).float())
        self.scale_dir, self.scale_time = float(scale_dir), float(scale_time)
        n, k = table.positions.shape
        self.dir_raw = nn.Parameter(self._raw(table.scale_dir, self.scale_dir, (n, k))) if scale_dir > 0 else None
        self.time_raw = nn.Parameter(self._raw(table.scale_time, self.scale_time, (n, k))) if scale_time > 0 else None

    @staticmethod
    def _raw(values, rng, shape):
        if values is None:
            return torch.zeros(shape)
        u = ((values - (1 - rng)) / (2 * rng)).clamp(1e-6, 1 - 1e-6)
        return torch.logit(u).float()

    @property
    def num_steps(self) -> int:
        return self.seg_logits.shape[0] + 1

    def _scale(self, raw, rng):
        return None if raw is None else (1 - rng) + 2 * rng * torch.sigmoid(raw)

    def row(self, n: int, dtype=torch.float32, device=None) -> dict[str, torch.Tensor]:
        seg = torch.softmax(self.seg_logits[n], -1)
        K = seg.shape[0] - 1
        ones = torch.ones(K, dtype=dtype, device=device)
        c, a = self._scale(self.dir_raw, self.scale_dir), self._scale(self.time_raw, self.scale_time)
        return {"positions": torch.cumsum(seg, -1)[:K].to(dtype=dtype, device=device),
                "weights": torch.softmax(self.w_logits[n], -1).to(dtype=dtype, device=device),
                "scale_dir": ones if c is None else c[n].to(dtype=dtype, device=device),
                "scale_time": ones if a is None else a[n].to(dtype=dtype, device=device)}

    @torch.no_grad()
    def to_table(self, meta: dict | None = None, provenance: dict | None = None) -> EPDTable:
        seg = torch.softmax(self.seg_logits.double(), -1)
        return EPDTable.from_segments(
            seg, torch.softmax(self.w_logits.double(), -1),
            scale_dir=None if self.dir_raw is None else self._scale(self.dir_raw.double(), self.scale_dir),
            scale_time=None if self.time_raw is None else self._scale(self.time_raw.double(), self.scale_time),
            meta={**self.meta, **(meta or {}), "scale_dir": self.scale_dir, "scale_time": self.scale_time},
            provenance=provenance or {})


@dataclass
class DistillConfig:
    """Stage-1 hyper-parameters (config section ``distill``)."""

    iterations: int = 300
    batch: int = 128
    lr: float = 0.05
    cosine: bool = True
    lr_min_factor: float = 0.1
    final_weight: float = 1.0
    feature_weight: float = 0.0  # final-step loss on the backbone metric's features (0: off)
    detach_between_steps: bool = False
    # recompute each denoiser call in the backward pass instead of storing its activations (same gradients): the
    # memory of backpropagating through N-1 steps x K points of a large network at distill.batch images
    checkpoint_denoiser: bool = False
    # images per forward/backward pass (gradients accumulated over the batch; None: the whole batch at once): the
    # peak memory of distillation is set by this, the batch stays the optimisation's
    micro_batch: int | None = None
    save_every: int = 50
    seed: int = 0
    init_r_base: float = 0.5
    init_r_eps: float = 0.33

    @classmethod
    def from_dict(cls, d: dict | None) -> "DistillConfig":
        cfg = dataclass_from_dict(cls, d, "distill")
        if cfg.micro_batch is not None and cfg.micro_batch < 1:
            raise ConfigError(f"distill.micro_batch: must be >= 1 (or null), got {cfg.micro_batch}")
        if cfg.iterations < 1 or cfg.batch < 1 or cfg.lr <= 0:
            raise ConfigError("distill: iterations and batch must be >= 1 and lr > 0")
        if not cfg.feature_weight >= 0:
            raise ConfigError(f"distill.feature_weight: must be >= 0, got {cfg.feature_weight}")
        return cfg


def _lr_at(cfg: DistillConfig, it: int) -> float:
    if not cfg.cosine:
        return cfg.lr
    lo = cfg.lr * cfg.lr_min_factor
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * it / cfg.iterations))


def distill(backbone, *, sigmas: torch.Tensor, x_init: torch.Tensor, targets: torch.Tensor, prompts: list[str],
            num_points: int, afs: bool, cfg: DistillConfig, out_dir: str | Path, scale_dir: float = 0.0,
            scale_time: float = 0.0, meta: dict | None = None, run=None, seeds: list[int] | None = None,
            feature_fn=None, plugin: str | None = None) -> EPDTable:
    """Learn a table; writes ``out_dir/table.{safetensors,json}``, ``distill_log.jsonl``, ``checkpoint.pt``.

    Args:
        backbone: a :class:`~epd.backbones.base.Backbone` (frozen).
        sigmas (`torch.Tensor`): student grid (``N`` points).
        x_init (`torch.Tensor`): teacher initial states ``(n, ...)``.
        targets (`torch.Tensor`): teacher states at student points 1..N-1, ``(n, N-1, ...)``.
        prompts (`list[str]`): prompt of each trajectory.
        num_points (`int`): K.  afs (`bool`): analytic first step.
        run: optional :class:`epd.tracking.Run` for MLflow curves.
        seeds (`list[int]`, *optional*): teacher seed of each trajectory (named in NaN/inf errors).
        feature_fn (*optional*): differentiable map from final states to metric features; with
            ``cfg.feature_weight > 0`` the loss adds ``feature_weight * mean ||f(x_N) - f(x_N^teacher)||^2 / d``.
        plugin (`str`, *optional*): ``"ipndm"`` trains the table for the plugin sampler (EPD-/AMED-Plugin).
    """
    _check_inputs(cfg, feature_fn, sigmas, x_init, targets, prompts)
    (out_dir := Path(out_dir)).mkdir(parents=True, exist_ok=True)
    N = len(sigmas)
    torch.manual_seed(cfg.seed)
    meta = {"num_steps": N, "num_points": num_points, "afs": afs, **(meta or {})}
    init = uniform_table(N, num_points, r_base=cfg.init_r_base, r_eps=cfg.init_r_eps, meta=meta)
    params = EPDParameters(init, scale_dir, scale_time)
    opt = torch.optim.Adam(params.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    gen = torch.Generator().manual_seed(cfg.seed)
    ckpt = out_dir / "checkpoint.pt"
    fingerprint = _fingerprint(cfg, sigmas, x_init, targets, num_points, afs, scale_dir, scale_time, plugin)
    start, history = _resume(ckpt, fingerprint, params, opt, gen)
    den = _frozen_denoiser(backbone, cfg)
    dtype = x_init.dtype
    device = torch.device(getattr(backbone, "device", "cpu"))  # teacher states stay in host memory; batches move
    sig = sigmas.to(device, dtype)
    t0 = time.time()
    bar = tqdm(range(start, cfg.iterations), desc=f"distill N={N} K={num_points}", initial=start,
               total=cfg.iterations, unit="it")
    oom = lambda: _out_of_memory(cfg)  # noqa: E731
    for it in bar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(cfg, it)
        idx = torch.randperm(len(x_init), generator=gen)[: cfg.batch]
        labels = [f"distill iteration {it + 1}, teacher trajectory {i}"
                  f"{f' (seed {seeds[i]})' if seeds is not None else ''}, prompt {prompts[i]!r}" for i in idx.tolist()]
        opt.zero_grad(set_to_none=True)
        loss, per_step, feat = _accumulate(
            lambda sub, lab: _forward(backbone, den, params, x_init[sub].to(device), targets[sub].to(device),
                                      [prompts[i] for i in sub.tolist()], sig, afs, cfg, feature_fn, lab, it, oom,
                                      plugin),
            idx, labels, cfg.micro_batch or len(idx), oom)
        rec = _optimizer_step(params, opt, it, loss, per_step, feat)
        history.append(rec)
        bar.set_postfix(loss=f"{rec['loss']:.4g}")
        if run is not None:
            run.metrics({"loss": rec["loss"], "final_rmse": rec["final_rmse"]}, step=it + 1)
        if (it + 1) % cfg.save_every == 0 or it + 1 == cfg.iterations:
            _save_checkpoint(ckpt, {"params": params.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                                    "iteration": it + 1, "history": history, "fingerprint": fingerprint})
    return _write_table(params, cfg, history, time.time() - t0, out_dir)


class _Checkpointed:
    """A denoiser whose activations are recomputed in the backward pass (``torch.utils.checkpoint``); every other
    attribute (coordinates, pass counts, finite-check policy) is the wrapped denoiser's."""

    def __init__(self, den):
        self.den = den

    def __call__(self, x, sigma, cond=None):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.den, x, sigma, cond, use_reentrant=False)

    def __getattr__(self, name):
        return getattr(self.den, name)


def _optimizer_step(params, opt, it: int, loss, per_step, feat) -> dict:
    """Adam step on the accumulated gradient (NaN/inf entries zeroed); the iteration's log record."""
    for p in params.parameters():
        if p.grad is not None:
            torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
    opt.step()
    return {"iteration": it + 1, "loss": loss.item(), "final_rmse": per_step[-1].detach().sqrt().item(),
            "lr": opt.param_groups[0]["lr"], **({"feature_loss": feat.item()} if feat is not None else {})}


def _write_table(params, cfg: DistillConfig, history: list, seconds: float, out_dir: Path) -> EPDTable:
    table = params.to_table(provenance={"stage": "distill", "iterations": cfg.iterations, "config": asdict(cfg),
                                        "final_loss": history[-1]["loss"] if history else None,
                                        "seconds": round(seconds, 2)})
    save(table, out_dir / "table")
    atomic_write_text(out_dir / "distill_log.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    return table


def _check_inputs(cfg, feature_fn, sigmas, x_init, targets, prompts) -> None:
    if cfg.feature_weight > 0 and feature_fn is None:
        raise ConfigError("distill.feature_weight: this backbone has no differentiable metric feature extractor; "
                          "set it to 0")
    N = len(sigmas)
    if targets.shape[1] != N - 1 or targets.shape[0] != x_init.shape[0] or len(prompts) != x_init.shape[0]:
        raise ConfigError(f"teacher set shapes do not match the student: states {tuple(targets.shape)}, "
                          f"x_init {tuple(x_init.shape)}, {len(prompts)} prompts, grid of {N} points")


def _frozen_denoiser(backbone, cfg: DistillConfig):
    """The backbone's denoiser with its weights frozen (only the table learns), checkpointed when configured: each
    call is recomputed in the backward pass and, where the backbone can, that recomputation keeps only its network's
    block boundaries (capability ``block_checkpointing``)."""
    den = backbone.denoiser
    for p in backbone.weights():  # else a diffusers network accumulates a gradient for each of its weights
        p.requires_grad_(False)
    # cuDNN's attention backward fails on FLUX at 1024 px (torch 2.11, H100/H200: "mha_graph.execute ... is_good()");
    # the flash / memory-efficient kernels differentiate it. Process-wide: `epd distill` runs nothing else.
    torch.backends.cuda.enable_cudnn_sdp(False)
    if not cfg.checkpoint_denoiser:
        return den
    if getattr(backbone, "block_checkpointing", False):
        backbone.enable_block_checkpointing()
    return _Checkpointed(den)


def _out_of_memory(cfg: DistillConfig):
    return out_of_memory_names("distill.micro_batch", cfg.micro_batch or cfg.batch, "Stage-1 distillation (also "
                               "distill.checkpoint_denoiser: true recomputes activations in the backward pass)")


def _forward(backbone, den, params, x, target, prompts, sig, afs, cfg, feature_fn, labels, it, oom, plugin=None):
    """The student's trajectory from ``x`` and its loss against the teacher states (checked finite)."""
    with oom():
        out = sample_epd(den, x, sig, cond=backbone.prepare(prompts), table=params, afs=afs, grad=True, plugin=plugin,
                         return_trajectory=True, detach_between_steps=cfg.detach_between_steps, context=labels)
    traj = torch.stack(out.trajectory[1:], 1)
    loss, per_step, feat = _loss(traj, target, cfg, feature_fn)
    if not torch.isfinite(loss):
        bad = (~torch.isfinite(((traj - target) ** 2).flatten(1).sum(1))).nonzero().flatten().tolist()
        raise NonFiniteError(f"distillation loss is NaN/inf at iteration {it + 1} (per-step losses "
                             f"{per_step.tolist()}); first affected: {labels[bad[0]] if bad else 'unknown'}")
    return loss, per_step, feat


def _accumulate(forward, idx, labels, micro: int, oom):
    """Backpropagate the batch's loss in micro-batches of ``micro`` images (``distill.micro_batch``): each part's
    loss weighted by its share of the batch, so the gradient is the whole batch's (one part: the very same bits).
    Returns the batch's ``(loss, per-step losses, feature term)``, detached."""
    total = None
    for lo in range(0, len(idx), micro):
        sub = idx[lo:lo + micro]
        w = len(sub) / len(idx)
        loss, per_step, feat = forward(sub, labels[lo:lo + micro])
        with oom():
            (loss * w).backward()
        part = [w * t.detach() if t is not None else None for t in (loss, per_step, feat)]
        total = part if total is None else [a + b if a is not None else None for a, b in zip(total, part)]
    return tuple(total)


def _loss(traj: torch.Tensor, target: torch.Tensor, cfg: DistillConfig, feature_fn):
    """Per-step L2 to the teacher states along the student's own trajectory (the last step weighted
    ``final_weight``), plus the optional final-step feature term. Returns ``(loss, per-step L2, feature term)``."""
    per_step = ((traj - target) ** 2).flatten(2).mean(2).mean(0)  # (N-1,)
    w = torch.ones_like(per_step)
    w[-1] = cfg.final_weight
    loss = (w * per_step).sum()
    feat = None
    if cfg.feature_weight > 0:
        with torch.no_grad():
            f_tea = feature_fn(target[:, -1])
        feat = ((feature_fn(traj[:, -1]) - f_tea) ** 2).mean()
        loss = loss + cfg.feature_weight * feat
    return loss, per_step, feat


def _resume(ckpt: Path, fingerprint: str, params, opt, gen) -> tuple[int, list]:
    """Load ``ckpt`` into the parameters, optimiser and generator if it exists; returns ``(iteration, history)``."""
    if not ckpt.exists():
        return 0, []
    try:
        state = torch.load(ckpt, weights_only=True)
        params.load_state_dict(state["params"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        start, history = int(state["iteration"]), list(state["history"])
    except Exception as e:  # noqa: BLE001 - corrupt zip, refused pickle global, wrong keys: all reported alike
        raise EPDError(f"{ckpt}: cannot resume from this checkpoint ({load_error_text(e)}); it is not a "
                       "distillation checkpoint written by epd: delete it to start over") from None
    if state.get("fingerprint", fingerprint) != fingerprint:
        raise ConfigError(f"{ckpt}: was written for other distillation settings or another teacher set; "
                          "use another --out or delete the checkpoint to start over")
    log.info("resuming distillation at iteration %d", start)
    return start, history


def _save_checkpoint(ckpt: Path, state: dict) -> None:
    buf = io.BytesIO()  # serialised in memory, so a full disk is reported as such (see atomic_path)
    torch.save(state, buf)
    atomic_write_bytes(ckpt, buf.getvalue())


def _fingerprint(cfg, sigmas, x_init, targets, num_points, afs, scale_dir, scale_time, plugin=None) -> str:
    """What a checkpoint must agree on to be resumed: settings, grid and the teacher set's initial noise."""
    import hashlib

    h = hashlib.sha256(x_init.detach().double().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
    d = {k: v for k, v in asdict(cfg).items() if k != "save_every"}
    return config_hash({**d, "sigmas": [float(v) for v in sigmas.tolist()], "K": num_points, "afs": bool(afs),
                        "scale_dir": scale_dir, "scale_time": scale_time, "x_init": h,
                        "targets": list(targets.shape), **({"plugin": plugin} if plugin else {})})


def metric_features(sec: dict, weights_dir, device="cpu"):
    """The differentiable feature map of the backbone's own metric, for ``distill.feature_weight``: the backbone
    class's ``metric_features`` capability (digits: the classifier's penultimate features, those of digits-FD, of the
    decoded final state)."""
    from .backbones import backbone_class, kinds_with

    cls = backbone_class(sec.get("kind"))
    if not cls.supports("metric_features"):
        raise ConfigError(f"distill.feature_weight: backbone kind {sec.get('kind')!r} has no differentiable metric "
                          f"feature extractor here (only {', '.join(kinds_with('metric_features'))}); set it to 0")
    return cls.metric_features(weights_dir, device)


# ----------------------------------------------------------------------------------------------- CLI
def add_arguments(p):
    p.add_argument("--config", required=True)
    p.add_argument("--backbone", required=True)
    p.add_argument("--nfe", type=int, required=True)
    p.add_argument("--teacher", required=True, help="teacher folder written by `epd teacher`")
    p.add_argument("--out", required=True, help="output folder (table.safetensors/json, log, checkpoint)")
    p.add_argument("--weights", default=None, help="trained backbone folder (embedded backbone)")
    p.add_argument("--device", default="cpu")


def run(args):
    from . import tracking
    from .backbones import load_backbone
    from .config import backbone_section, load_config
    from .study import load_teacher, study_spec, teacher_sigmas

    cfg = load_config(args.config)
    sec = backbone_section(cfg, args.backbone)
    spec = study_spec(sec, args.nfe)
    dcfg = DistillConfig.from_dict(sec.get("distill"))
    bb = load_backbone(sec, device=args.device, weights_dir=args.weights)
    student, _ = teacher_sigmas(bb, spec.N, 0, spec.schedule, spec.rho)
    manifest, x_init, states = load_teacher(args.teacher, expect_sigmas=student)
    meta = {"backbone": sec.get("kind", args.backbone), "schedule_type": spec.schedule or bb.default_schedule,
            "schedule_rho": spec.rho, "sigma_min": float(student[-1]), "sigma_max": float(student[0]),
            "coords": bb.coords, "guidance_rate": sec.get("guidance"), "guidance_type": "cfg",
            "sampler_stu": "epd", "sampler_tea": manifest["solver"], "M": manifest["M"],
            "dataset_name": args.backbone}
    params = {"nfe": args.nfe, "K": spec.K, "afs": spec.afs, **asdict(dcfg), "teacher_hash": manifest["config_hash"]}
    with tracking.start_run("distill", backbone=args.backbone, params=params,
                            tags={"nfe": args.nfe, "teacher": str(args.teacher),
                                  "table": str(Path(args.out) / "table.safetensors")}) as r:
        table = distill(bb, sigmas=student, x_init=x_init, targets=states, prompts=manifest["prompts"],
                        num_points=spec.K, afs=spec.afs, cfg=dcfg, out_dir=args.out, scale_dir=spec.scale_dir,
                        scale_time=spec.scale_time, meta=meta, run=r, seeds=manifest.get("seeds"),
                        feature_fn=metric_features(sec, args.weights, args.device) if dcfg.feature_weight > 0 else None)
        r.artifact(Path(args.out) / "table.json")
    print(table.summary())
    return 0
