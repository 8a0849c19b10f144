"""``epd bench backbone``: train the embedded digits backbone from scratch and measure it (JSON report).

What it shows (the acceptance criteria of the embedded backbone):

* training time at the configured budget on this machine (with CPU count and load average),
* teacher quality: a high-NFE solve at the configured CFG scale, classified as the prompted digit, and its
  digits-FD against the held-out digits next to the FD between real train and held-out digits **at equal sample
  counts** (FD is biased by sample size),
* generalisation: held-out vs train denoising loss, and the distance of samples to their nearest training digit
  next to that of real held-out digits,
* solver separation: the baselines at NFE 3/5/7/9 (FD, accuracy, final-state RMSE vs the teacher, same noise).

Heun and DPM-Solver-2 reach odd NFE the way EDM's sampler does: the grid gets a final step to ``sigma = 0``, which
is an Euler step (``denoise_to_zero``); all other runs end at ``sigma_min`` like the teacher.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, EPDError
from ..io import atomic_write_json

__all__ = ["BenchConfig", "run_bench", "add_arguments", "run"]

log = logging.getLogger(__name__)

BASELINES = ["euler", "heun", "dpm2", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm"]


@dataclass
class BenchConfig:
    """Options of the backbone benchmark (``backbones.digits.bench`` in the YAML config).

    Args:
        samples_per_class (`int`): generated samples per digit; ``10 x`` this must not exceed the train split
            (the real-data FD reference uses a train subset of the same size).
        teacher_solver (`str`), teacher_steps (`int`): the reference solve (``steps + 1`` grid points).
        solvers (`list[str]`), nfes (`list[int]`): the baselines table.
        seed (`int`): first noise seed (sample ``i`` uses seed ``seed + i``).
        subset_seed (`int`): seed of the train subset used as the equal-count real reference.
        guidance_sweep (`list[float]`), sweep_samples_per_class (`int`), sweep_steps (`int`): a smaller Heun solve
            at several CFG scales, showing that guidance works (accuracy and rewards per scale; its FD values use
            their own sample count and compare only with each other).
    """

    samples_per_class: int = 150
    teacher_solver: str = "heun"
    teacher_steps: int = 50
    solvers: list = field(default_factory=lambda: list(BASELINES))
    nfes: list = field(default_factory=lambda: [3, 5, 7, 9])
    seed: int = 0
    subset_seed: int = 0
    guidance_sweep: list = field(default_factory=lambda: [0.0, 1.0, 2.0])
    sweep_samples_per_class: int = 50
    sweep_steps: int = 25

    @classmethod
    def from_dict(cls, d: dict | None) -> "BenchConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        for k in d:
            if k not in known:
                raise ConfigError(f"backbones.digits.bench.{k}: unknown key; known: {sorted(known)}")
        return cls(**d)


def _read_config(path: Path) -> tuple[dict, "object", BenchConfig]:
    import yaml

    from ..backbones.digits.train import load_train_config

    train_cfg = load_train_config(path)
    section = yaml.safe_load(path.read_text())["backbones"]["digits"]
    guidance = section.get("guidance", 1.0)
    if not isinstance(guidance, (int, float)) or isinstance(guidance, bool):
        raise ConfigError(f"{path}: backbones.digits.guidance must be a number, got {guidance!r}")
    return section, train_cfg, BenchConfig.from_dict(section.get("bench"))


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _nearest_distance(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """L2 distance from each row of ``x`` to its nearest row of ``ref`` (flattened images)."""
    return torch.cdist(x.flatten(1).double(), ref.flatten(1).double()).min(1).values


def _machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "processor": platform.processor(),
            "loadavg_1_5_15": [round(v, 2) for v in load] if load else None}


def run_bench(config_path: str | os.PathLike, out: str | os.PathLike, weights: str | os.PathLike | None = None,
              workdir: str | os.PathLike | None = None) -> dict:
    """Train (unless ``weights`` is given) and measure the digits backbone; write the JSON report to ``out``.

    Args:
        config_path: workflow YAML with a ``backbones.digits`` section.
        out: JSON file to write.
        weights (*optional*): an existing training folder to measure instead of training.
        workdir (*optional*): train into this folder instead of a temporary one (kept afterwards).

    Returns:
        The report dict.
    """
    from ..backbones.digits.train import train

    config_path = Path(config_path)
    section, train_cfg, bcfg = _read_config(config_path)
    guidance = float(section.get("guidance", 1.0))
    report: dict = {"config": str(config_path), "guidance": guidance, "machine_start": _machine()}
    tmp = None
    try:
        if weights is None:
            if workdir is None:
                tmp = tempfile.TemporaryDirectory(prefix="epd-bench-backbone-")
                workdir = tmp.name
            t0 = time.perf_counter()
            try:
                summary = train(train_cfg, workdir, progress=False)
            except EPDError as e:
                if tmp is None:
                    raise
                raise EPDError(f"bench: training in a temporary folder stopped ({e}); it cannot resume — pass "
                               "--workdir DIR to keep a resumable training folder") from None
            report["train_minutes"] = (time.perf_counter() - t0) / 60
            report["train_detail"] = {"classifier_seconds": summary["classifier_seconds"],
                                      "denoiser_seconds": summary["denoiser_seconds"], "steps": train_cfg.steps,
                                      "batch_size": train_cfg.batch_size}
            report["machine_after_training"] = _machine()
            weights = workdir
        else:
            report["train_minutes"] = None
            report["weights"] = str(weights)
        report.update(_measure(Path(weights), guidance, train_cfg, bcfg))
    finally:
        if tmp is not None:
            tmp.cleanup()
    if report["train_minutes"] is not None:
        report["checks"]["train_under_10_min"] = report["train_minutes"] <= 10
    report["machine_end"] = _machine()
    atomic_write_json(out, report)
    return report


def _images01(x):
    return (x + 1) / 2


@dataclass
class _Ctx:
    """What the sections of :func:`_measure` share: the loaded backbone, the data split, the scorers, the samples'
    prompts, conditioning and starting noise, and the held-out digits' FD features."""

    backbone: object
    split: object
    bcfg: BenchConfig
    weights: Path
    fd_scorer: object
    acc_scorer: object
    prompts: list
    cond: object
    x_T: torch.Tensor
    n: int
    feats_ho: torch.Tensor | None = None


def _measure(weights: Path, guidance: float, train_cfg, bcfg: BenchConfig) -> dict:
    from ..backbones.digits import PROMPTS, DigitsBackbone, load_split
    from ..backbones.digits.scorers import make_accuracy, make_fd

    backbone = DigitsBackbone.load(weights, guidance)
    split = load_split(train_cfg.split_seed, train_cfg.n_heldout, train_cfg.upsample)
    n = 10 * bcfg.samples_per_class
    if n > len(split.x_train):
        raise ConfigError(f"backbones.digits.bench.samples_per_class: {n} samples exceed the {len(split.x_train)} "
                          "train digits that serve as the equal-count real reference; lower it")
    prompts = [PROMPTS[c] for c in range(10) for _ in range(bcfg.samples_per_class)]
    ctx = _Ctx(backbone, split, bcfg, weights, make_fd(weights), make_accuracy(weights), prompts,
               backbone.prepare(prompts), backbone.noise(list(range(bcfg.seed, bcfg.seed + n))), n)
    res: dict = {"n_samples": n, "n_heldout": len(split.x_heldout), "n_train": len(split.x_train)}
    feats_tr = _real_reference(ctx, res)
    teacher, img_t = _teacher_section(ctx, res, feats_tr)
    align, real = _rewards_section(ctx, res, img_t)
    _generalisation(ctx, res, img_t, train_cfg)
    e5 = _baselines(ctx, res, teacher)
    res["guidance_sweep"] = _guidance_sweep(backbone, bcfg, ctx.fd_scorer, ctx.acc_scorer, align, real, ctx.feats_ho)
    from ..io import sha256_file

    res["model_sha256"] = sha256_file(weights / "model.safetensors")[:16]
    res["model_meta"] = {k: v for k, v in json.loads((weights / "model.json").read_text()).items()
                         if k in ("arch", "steps", "train_seconds", "num_params", "final_log")}
    g = res["generalisation"]
    res["checks"] = {
        "train_under_10_min": None,
        "teacher_accuracy_ge_0.95": res["teacher_accuracy"] >= 0.95,
        "teacher_fd_within_2x_real": res["teacher_fd"] <= 2 * res["real_fd_train_vs_heldout"],
        "euler_nfe5_fd_ge_1.5x_teacher": e5 is not None and e5["fd"] >= 1.5 * res["teacher_fd"],
        "nearest_train_distance_within_20pct_of_heldout": abs(g["nearest_distance_ratio"] - 1) <= 0.2,
    }
    return res


def _real_reference(ctx: _Ctx, res: dict) -> torch.Tensor:
    """Real reference at equal counts: a train subset of n digits vs all held-out digits."""
    from ..backbones.digits import PROMPTS

    split, n = ctx.split, ctx.n
    ctx.feats_ho = ctx.fd_scorer.features(_images01(split.x_heldout))
    sub = torch.randperm(len(split.x_train), generator=torch.Generator().manual_seed(ctx.bcfg.subset_seed))[:n]
    feats_tr = ctx.fd_scorer.features(_images01(split.x_train[sub]))
    res["real_fd_train_vs_heldout"] = ctx.fd_scorer.compute(feats_tr, ctx.feats_ho)
    res["fd_counts"] = {"generated_or_train_subset": n, "heldout_reference": len(split.x_heldout),
                        "note": "every FD in this report is n generated (or n real train) vs all held-out digits"}
    res["real_heldout_accuracy"] = float(ctx.acc_scorer(_images01(split.x_heldout),
                                                        [PROMPTS[int(c)] for c in split.y_heldout]).mean())
    return feats_tr


def _teacher_section(ctx: _Ctx, res: dict, feats_tr):
    """The teacher's samples, accuracy and FD, and its convergence (the same solve with twice the steps)."""
    from ..solvers import solve

    bb, bcfg = ctx.backbone, ctx.bcfg
    t = time.perf_counter()
    teacher = solve(bcfg.teacher_solver, bb.denoiser, ctx.x_T, bb.sigmas(bcfg.teacher_steps + 1), cond=ctx.cond)
    res["teacher"] = {"solver": bcfg.teacher_solver, "steps": bcfg.teacher_steps, "nfe": teacher.nfe,
                      "forward_passes": teacher.forward_passes, "seconds": time.perf_counter() - t}
    img_t = bb.decode(teacher.x)
    res["teacher_accuracy"] = float(ctx.acc_scorer(img_t, ctx.prompts).mean())
    feats_t = ctx.fd_scorer.features(img_t)
    res["teacher_fd"] = ctx.fd_scorer.compute(feats_t, ctx.feats_ho)
    res["teacher_fd_vs_train_subset"] = ctx.fd_scorer.compute(feats_t, feats_tr)
    res["teacher_fd_ratio"] = res["teacher_fd"] / res["real_fd_train_vs_heldout"]
    res["teacher_samples_sha256"] = _sha(teacher.x)
    k = min(ctx.n, 300)
    fine = solve(bcfg.teacher_solver, bb.denoiser, ctx.x_T[:k], bb.sigmas(2 * bcfg.teacher_steps + 1),
                 cond=ctx.cond[:k])
    res["teacher"]["rmse_vs_double_steps"] = float((fine.x - teacher.x[:k]).pow(2).mean().sqrt())
    return teacher, img_t


def _rewards_section(ctx: _Ctx, res: dict, img_t):
    """Rewards of the teacher vs real held-out digits (0 is the maximum of both); returns the two reward heads."""
    from ..backbones.digits import PROMPTS
    from ..backbones.digits.scorers import make_alignment, make_realism

    align, real = make_alignment(ctx.weights), make_realism(ctx.weights)
    ho, ho_prompts = _images01(ctx.split.x_heldout), [PROMPTS[int(c)] for c in ctx.split.y_heldout]
    res["rewards"] = {
        "teacher": {"digits_alignment": float(align(img_t, ctx.prompts).mean()),
                    "digits_realism": float(real(img_t, ctx.prompts).mean())},
        "heldout_real": {"digits_alignment": float(align(ho, ho_prompts).mean()),
                         "digits_realism": float(real(ho, ho_prompts).mean())},
        "upper_bound": {"digits_alignment": 0.0, "digits_realism": 0.0},
    }
    return align, real


def _generalisation(ctx: _Ctx, res: dict, img_t, train_cfg) -> None:
    """Train vs held-out denoising loss, and nearest-train distances of samples vs of held-out digits."""
    from ..backbones.digits import to_base_resolution
    from ..backbones.digits.train import denoising_loss

    split = ctx.split
    x_tr_base = to_base_resolution(_images01(split.x_train))
    nn_samples = _nearest_distance(to_base_resolution(img_t), x_tr_base)
    nn_heldout = _nearest_distance(to_base_resolution(_images01(split.x_heldout)), x_tr_base)
    net = ctx.backbone.denoiser.net
    g = res["generalisation"] = {
        "train_loss": denoising_loss(net, split.x_train, split.y_train, train_cfg.p_mean, train_cfg.p_std),
        "heldout_loss": denoising_loss(net, split.x_heldout, split.y_heldout, train_cfg.p_mean, train_cfg.p_std),
        "nearest_train_distance_samples": float(nn_samples.mean()),
        "nearest_train_distance_heldout": float(nn_heldout.mean()),
        "note": "L2 in [-1, 1] pixel units at 8x8; losses are the EDM-weighted loss at 8 log-normal quantiles",
    }
    g["heldout_over_train_loss"] = g["heldout_loss"] / g["train_loss"]
    g["nearest_distance_ratio"] = g["nearest_train_distance_samples"] / g["nearest_train_distance_heldout"]


def _baselines(ctx: _Ctx, res: dict, teacher) -> dict | None:
    """Every baseline solver at every NFE against the teacher; returns the Euler NFE-5 row (or None)."""
    from ..solvers import solve, steps_for_nfe

    bb, table, t = ctx.backbone, [], time.perf_counter()
    for name in ctx.bcfg.solvers:
        for nfe in ctx.bcfg.nfes:
            to_zero = False
            try:
                points = steps_for_nfe(name, nfe)
            except ConfigError:
                if name not in ("heun", "dpm2") or nfe % 2 == 0:
                    raise
                points, to_zero = (nfe + 1) // 2, True
            out = solve(name, bb.denoiser, ctx.x_T, bb.sigmas(points), cond=ctx.cond, denoise_to_zero=to_zero)
            img = bb.decode(out.x)
            table.append({"solver": name, "nfe": out.nfe, "grid_points": points, "final_step_to_zero": to_zero,
                          "forward_passes": out.forward_passes,
                          "fd": ctx.fd_scorer.compute(ctx.fd_scorer.features(img), ctx.feats_ho),
                          "accuracy": float(ctx.acc_scorer(img, ctx.prompts).mean()),
                          "rmse_vs_teacher": float((out.x - teacher.x).pow(2).mean().sqrt())})
            if out.nfe != nfe:
                raise EPDError(f"bench: {name} at NFE {nfe} made {out.nfe} evaluations")
    res["baselines_seconds"] = time.perf_counter() - t
    res["baselines"] = table
    e5 = next((r for r in table if r["solver"] == "euler" and r["nfe"] == 5), None)
    res["euler_nfe5_fd"] = e5["fd"] if e5 else None
    res["euler_nfe5_fd_over_teacher"] = e5["fd"] / res["teacher_fd"] if e5 else None
    return e5


def _guidance_sweep(backbone, bcfg: BenchConfig, fd_scorer, acc_scorer, align, real, feats_ho) -> dict:
    from ..backbones.digits import PROMPTS, DigitsBackbone
    from ..solvers import solve

    prompts = [PROMPTS[c] for c in range(10) for _ in range(bcfg.sweep_samples_per_class)]
    cond = backbone.prepare(prompts)
    x_T = backbone.noise(list(range(bcfg.seed, bcfg.seed + len(prompts))))
    sigmas = backbone.sigmas(bcfg.sweep_steps + 1)
    out = {"n_samples": len(prompts), "solver": bcfg.teacher_solver, "steps": bcfg.sweep_steps, "scales": {}}
    for w in bcfg.guidance_sweep:
        bb = DigitsBackbone(backbone.denoiser.net, backbone.meta, guidance=w)
        img = bb.decode(solve(bcfg.teacher_solver, bb.denoiser, x_T, sigmas, cond=cond).x)
        out["scales"][str(float(w))] = {
            "accuracy": float(acc_scorer(img, prompts).mean()),
            "digits_alignment": float(align(img, prompts).mean()),
            "digits_realism": float(real(img, prompts).mean()),
            "fd": fd_scorer.compute(fd_scorer.features(img), feats_ho),
        }
    return out


def add_arguments(p) -> None:
    p.add_argument("--config", required=True, help="workflow YAML with a backbones.digits section")
    p.add_argument("--out", required=True, help="JSON report to write")
    p.add_argument("--weights", default=None, help="measure this trained folder instead of training from scratch")
    p.add_argument("--workdir", default=None, help="train into this folder (kept) instead of a temporary one")


def run(args) -> int:
    report = run_bench(args.config, args.out, weights=args.weights, workdir=args.workdir)
    keys = ("train_minutes", "teacher_accuracy", "teacher_fd", "real_fd_train_vs_heldout", "euler_nfe5_fd")
    print(json.dumps({k: report.get(k) for k in keys} | {"checks": report["checks"]}, indent=2))
    return 0
