"""``epd bench rdpo``: RDPO against its Stage-1 start table on the embedded backbone, held-out prompts and seeds.

Starting from the distilled table at NFE 5, RDPO trains with the configured digits rewards; the best checkpoint
is chosen on RDPO's own held-out selection seeds. The comparison below uses a third, disjoint set of seeds
(paired: the same noise and prompt for both tables), so neither selection nor training saw it. Reported: mean
reward of both tables, the paired difference with its standard error and p-value, and digits-FD of both sample
sets against the held-out real digits (equal counts).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from ..io import atomic_write_json
from ..metrics.stats import paired_diff
from .study import distilled_table, ensure_backbone, eval_set, load_study, machine, run_solver


def bench_rdpo(config: str, workdir: Path, weights: str | None = None, nfe: int = 5, n_eval: int = 1000,
               steps: int | None = None) -> dict:
    from ..rdpo.cli import make_guard, setup
    from ..rdpo.trainer import RDPOTrainer
    from ..rewards import get_scorer

    cfg, sec = load_study(config)
    t0 = time.time()
    bb, wdir, _ = ensure_backbone(config, sec, workdir, weights)
    table, st = distilled_table(bb, sec, nfe, workdir, wdir)
    from ..predictor import save

    save(table, workdir / "distilled")
    _, _, sigmas, reward, tp, ep, es, rcfg = setup(cfg, sec["name"], str(workdir / "distilled.safetensors"), str(wdir))
    if steps:
        rcfg.steps = steps
    t_rdpo = time.time()
    trainer = RDPOTrainer(bb, table, sigmas, reward, tp, ep, es, rcfg, workdir / "rdpo",
                          guard=make_guard(rcfg, str(wdir)))
    best = trainer.train()
    rdpo_seconds = time.time() - t_rdpo
    from ..predictor import load

    tuned = load(workdir / "rdpo" / "table_best.safetensors")
    seeds, prompts = eval_set(sec, n_eval, offset=700000)
    assert not set(seeds) & set(es), "evaluation seeds overlap RDPO's selection seeds"
    res = {}
    imgs = {}
    for name, tab in (("distilled", table), ("rdpo", tuned)):
        _, im, out = run_solver(bb, "epd", seeds, prompts, sigmas, table=tab)
        r, heads = reward(im, prompts)
        res[name] = {"reward": r, "heads": {k: float(v.mean()) for k, v in heads.items()}}
        imgs[name] = im
    fd = get_scorer("digits_fd", weights_dir=str(wdir))
    from ..backbones.digits import load_split

    meta = (getattr(bb, "meta", {}) or {}).get("data") or {}
    split = load_split(seed=int(meta.get("seed", 0)), upsample=int(meta.get("upsample", 1)))
    real = ((split.x_heldout + 1) / 2).clamp(0, 1).repeat(1, 3, 1, 1)
    pd = paired_diff(res["rdpo"]["reward"].numpy(), res["distilled"]["reward"].numpy())
    fd_d, fd_r = float(fd.compute(imgs["distilled"], real)), float(fd.compute(imgs["rdpo"], real))
    hist = trainer.history
    return {
        "benchmark": "rdpo", "backbone": "digits", "config": config, "nfe": nfe,
        "rewards": rcfg.rewards, "advantage": rcfg.advantage, "steps": rcfg.steps,
        "best_step": best["step"], "best_selection_reward": best["reward"],
        "guard": {"metric": rcfg.guard_metric, "max_ratio": rcfg.guard_max_ratio, "start": trainer.guard_ref,
                  "best": best.get("guard")},
        "n_eval": n_eval, "eval_seeds": f"{seeds[0]}-{seeds[-1]}",
        "selection_seeds": f"{es[0]}-{es[-1]}",
        "reward_distilled": float(res["distilled"]["reward"].mean()),
        "reward_rdpo": float(res["rdpo"]["reward"].mean()),
        "paired_diff": pd["diff"], "paired_se": pd["se"], "paired_t": pd["t"], "paired_p": pd["p"],
        "improvement_in_se": pd["diff"] / pd["se"] if pd["se"] > 0 else None,
        "heads_distilled": res["distilled"]["heads"], "heads_rdpo": res["rdpo"]["heads"],
        "fd_distilled": fd_d, "fd_rdpo": fd_r, "fd_ratio": fd_r / fd_d,
        "final_kl": next((h["kl"] for h in reversed(hist) if "kl" in h), None),
        "train_reward_first": next((h["mixed_reward_mean"] for h in hist if "mixed_reward_mean" in h), None),
        "train_reward_last": next((h["mixed_reward_mean"] for h in reversed(hist) if "mixed_reward_mean" in h), None),
        "rdpo_seconds": round(rdpo_seconds, 1), "seconds": round(time.time() - t0, 1), "machine": machine(),
        "table_distilled": {"positions": table.positions.tolist(), "weights": table.weights.tolist()},
        "table_rdpo": {"positions": tuned.positions.tolist(), "weights": tuned.weights.tolist()},
    }


def add_arguments(p):
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--weights", default=None, help="trained backbone folder (skip training)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--steps", type=int, default=None, help="override rdpo.steps")
    p.add_argument("--n-eval", type=int, default=1000)


def run(args):
    with tempfile.TemporaryDirectory() as tmp:
        wd = Path(args.workdir or tmp)
        wd.mkdir(parents=True, exist_ok=True)
        rec = bench_rdpo(args.config, wd, args.weights, n_eval=args.n_eval, steps=args.steps)
    atomic_write_json(args.out, rec)
    print(f"reward distilled {rec['reward_distilled']:.5f} -> rdpo {rec['reward_rdpo']:.5f}: "
          f"diff {rec['paired_diff']:.5f} +- {rec['paired_se']:.5f} (p={rec['paired_p']:.2g}); "
          f"FD {rec['fd_distilled']:.3f} -> {rec['fd_rdpo']:.3f}")
    _ = torch
    return 0
