"""``epd bench rdpo``: RDPO against its Stage-1 start table on the embedded backbone, held-out prompts and seeds.

Starting from the distilled table at NFE 5, RDPO trains with the configured digits rewards; the best checkpoint
is chosen on RDPO's own held-out selection seeds. The comparison below uses a third, disjoint set of seeds
(paired: the same noise and prompt for both tables), so neither selection nor training saw it. Reported: mean
reward of both tables, the paired difference with its standard error and p-value, and digits-FD of both sample
sets against the held-out real digits (equal counts).

What RDPO costs (issue 20), on the same evaluation seeds:

* the fixed-budget run is the config's RDPO for all its ``steps`` with the plateau rule off;
* ``early_stop_*``: the plateau rule (the config's when it turns one on, else ``--stop-patience``,
  ``--stop-min-gain-se``) replayed over the fixed-budget run's saved checkpoints, which is what a live run with the
  rule sees (training does not depend on it); the selected checkpoint's shortfall against the fixed-budget one is
  read against the fixed gain's SE and against the paired difference's SE (:func:`shortfall_readings`), with the
  held-out selection images spent beside the rollouts;
* ``efficient_*`` / ``rollouts_to_90pct``: a run with a third of the steps and the ``--efficient`` overrides
  (default: rollouts reused over 3 PPO epochs), its selected checkpoint's share of the fixed-budget gain;
* ``dp_identity_max_abs_diff``: ``epd rdpo --gpus 2`` (gloo on the CPU) against one process, same global batch;
* ``preempt_resume_identical``: ``epd rdpo`` sent SIGTERM at a random step (exit 143), run again, its table
  files against an uninterrupted run's, byte for byte.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import torch

from ..io import atomic_write_json, parse_seeds
from ..metrics.stats import paired_diff
from ..rdpo.stopping import RECORD_KEYS, STOP_KEYS, STOP_RULES, make_stopper
from .rdpo_checks import dp_and_preempt
from .study import distilled_table, ensure_backbone, eval_set, load_study, machine, run_solver

EFFICIENT = {"ppo_epochs": 3, "eval_interval": 5, "save_interval": 5}


def _prepare(config: str, workdir: Path, weights, nfe: int) -> dict:
    """Backbone, distilled start table and everything ``RDPOTrainer`` takes, from the study config."""
    from ..predictor import save
    from ..rdpo.cli import setup

    cfg, sec = load_study(config)
    bb, wdir, _ = ensure_backbone(config, sec, workdir, weights)
    table, _ = distilled_table(bb, sec, nfe, workdir, wdir)
    save(table, workdir / "distilled")
    _, _, sigmas, reward, tp, ep, es, rcfg = setup(cfg, sec["name"], str(workdir / "distilled.safetensors"), str(wdir))
    return {"config": config, "sec": sec, "bb": bb, "wdir": wdir, "table": table, "sigmas": sigmas, "reward": reward,
            "tp": tp, "ep": ep, "es": es, "rcfg": rcfg}


def _trainer(ctx: dict, rcfg, out: Path):
    from ..rdpo.cli import make_guard
    from ..rdpo.trainer import RDPOTrainer

    return RDPOTrainer(ctx["bb"], ctx["table"], ctx["sigmas"], ctx["reward"], ctx["tp"], ctx["ep"], ctx["es"], rcfg,
                       out, guard=make_guard(rcfg, str(ctx["wdir"])))


def _score(ctx: dict, table, seeds, prompts) -> dict:
    """Per-image reward, head means and images of ``table`` on the evaluation seeds."""
    _, im, _ = run_solver(ctx["bb"], "epd", seeds, prompts, ctx["sigmas"], table=table)
    r, heads = ctx["reward"](im, prompts)
    return {"reward": r, "heads": {k: float(v.mean()) for k, v in heads.items()}, "images": im}


def _gain(a: dict, b: dict) -> dict:
    pd = paired_diff(a["reward"].numpy(), b["reward"].numpy())
    return {**pd, "in_se": pd["diff"] / pd["se"] if pd["se"] > 0 else None}


def replay_stop(trainer, **rule) -> dict:
    """A stopping rule (``rdpo.stop_*`` keys, :func:`~epd.rdpo.stopping.make_stopper`) over a finished run's saved
    checkpoints: the step it stops at, the checkpoint the run would have selected by then (each evaluation
    recomputed from ``policy-step*.pt``) and the curve it saw."""
    if not trainer.history:
        trainer.try_resume()
    stopper = make_stopper(**rule)
    best, r0 = trainer.evaluate(trainer.start)
    stopper.start(r0, 0)
    trainer.guard_ref, best_step, best_guard, curve = trainer.last_guard, 0, trainer.last_guard, []
    steps = [h["step"] for h in trainer.history if h.get("step", 0) > 0 and "eval_reward" in h]
    for s in steps:
        state = torch.load(trainer.out / "checkpoints" / f"policy-step{s:06d}.pt", weights_only=True)
        trainer.policy.load_state_dict(state)
        mean, r = trainer.evaluate(trainer.policy.mean_table(meta=trainer.start.meta))
        ok = trainer._guard_ok()
        curve.append({"step": s, "gain": float((r - r0).mean()), "guard_ok": ok,
                      "guard_ratio": None if trainer.last_guard is None else trainer.last_guard / trainer.guard_ref})
        if mean > best and ok:
            best, best_step, best_guard = mean, s, trainer.last_guard
        if stopper.update(s, r, ok):
            break
    return {"stopped_at": stopper.stopped_at or steps[-1], "selected_step": best_step,
            "reason": stopper.reason or "budget", "evaluations": len(stopper.log),
            "selected_guard_ratio": None if best_guard is None else best_guard / trainer.guard_ref,
            "curve": [{**c, **{k: v if not isinstance(v, float) or math.isfinite(v) else None
                               for k, v in e.items() if k not in c}} for c, e in zip(curve, stopper.log)]}


def _checkpoint_table(trainer, step: int):
    state = torch.load(trainer.out / "checkpoints" / f"policy-step{step:06d}.pt", weights_only=True)
    trainer.policy.load_state_dict(state)
    return trainer.policy.mean_table(meta=trainer.start.meta)


def shortfall_readings(fixed, selected, base) -> dict:
    """How far the early-stopped selection falls short of the fixed-budget run, per-seed rewards on the same seeds.

    ``shortfall = mean(fixed - selected)``, read against two standard errors: (a) the paired SE of the fixed-budget
    gain ``mean(fixed - base)`` (``early_stop_within_1se``: issue 20's "within 1 SE of the fixed-budget run's
    held-out gain") and (b) the SE of the paired difference ``fixed - selected`` itself
    (``early_stop_within_1se_paired``: stricter, as the two tables score the same seeds and noise)."""
    vs, fg = paired_diff(fixed, selected), paired_diff(fixed, base)
    return {"early_stop_shortfall": vs["diff"], "early_stop_shortfall_se": vs["se"],
            "early_stop_fixed_gain_se": fg["se"], "early_stop_within_1se": bool(vs["diff"] <= fg["se"]),
            "early_stop_within_1se_paired": bool(vs["diff"] <= vs["se"])}


def _early_stop(ctx: dict, trainer, ev: dict, base: dict, fixed: dict, rule: dict) -> dict:
    """The rule replayed over the fixed-budget run; its selected checkpoint against the fixed run's on the
    evaluation seeds (:func:`shortfall_readings`)."""
    rep = replay_stop(trainer, **{k: v for k, v in rule.items() if k in STOP_KEYS})
    table = ctx["table"] if rep["selected_step"] == 0 else _checkpoint_table(trainer, rep["selected_step"])
    res = _score(ctx, table, ev["seeds"], ev["prompts"])
    g, fd = _gain(res, base), ev["fd"](res["images"])
    return {"early_stop_step": rep["stopped_at"], "early_stop_selected_step": rep["selected_step"],
            "early_stop_reason": rep["reason"], "early_stop_rule": rule,
            "early_stop_rollouts": rep["stopped_at"] * trainer.cfg.rollout_batch_size,
            "early_stop_eval_images": (rep["evaluations"] + 1) * len(trainer.eval_seeds),
            "early_stop_gain": g["diff"], "early_stop_gain_se": g["in_se"],
            **shortfall_readings(fixed["reward"].numpy(), res["reward"].numpy(), base["reward"].numpy()),
            "early_stop_fd": fd, "early_stop_fd_ratio": fd / base["fd"],
            "early_stop_guard_ratio": rep["selected_guard_ratio"], "early_stop_curve": rep["curve"]}


def _seed_rows(ctx: dict, workdir: Path, rule: dict, ev: dict, base: dict, run_seeds: list[int]) -> dict:
    """The rule against the fixed budget for several RDPO run seeds (``rdpo.seed``; the same start table, selection
    and evaluation seeds): per seed, the fixed run's best checkpoint, where the rule stops and what it selects."""
    from dataclasses import replace

    from ..predictor import load

    rows = []
    for seed in run_seeds:
        out = workdir / ("rdpo" if seed == ctx["rcfg"].seed else f"rdpo_seed{seed}")
        tr = _trainer(ctx, replace(ctx["rcfg"], seed=seed), out)
        best = tr.train()
        fixed = _score(ctx, load(out / "table_best.safetensors"), ev["seeds"], ev["prompts"])
        rep = replay_stop(tr, **{k: v for k, v in rule.items() if k in STOP_KEYS})
        sel = fixed if rep["selected_step"] == best["step"] else _score(
            ctx, ctx["table"] if rep["selected_step"] == 0 else _checkpoint_table(tr, rep["selected_step"]),
            ev["seeds"], ev["prompts"])
        r = shortfall_readings(fixed["reward"].numpy(), sel["reward"].numpy(), base["reward"].numpy())
        rows.append({"seed": seed, "fixed_best_step": best["step"], "fixed_gain": _gain(fixed, base)["diff"],
                     "stop_step": rep["stopped_at"], "selected_step": rep["selected_step"],
                     **{k.replace("early_stop_", ""): v for k, v in r.items()}})
    return {"early_stop_seeds": rows, "early_stop_seeds_within_1se": sum(r["within_1se"] for r in rows),
            "early_stop_seeds_within_1se_paired": sum(r["within_1se_paired"] for r in rows)}


def _efficiency(ctx: dict, workdir: Path, overrides: dict, ev: dict, base: dict, fixed_gain: float) -> dict:
    from dataclasses import replace

    from ..predictor import load

    rcfg = ctx["rcfg"]
    ecfg = replace(rcfg, **{"steps": math.ceil(rcfg.steps / 3), **overrides})
    t0 = time.time()
    tr = _trainer(ctx, ecfg, workdir / "rdpo_efficient")
    best = tr.train()
    res = _score(ctx, load(workdir / "rdpo_efficient" / "table_best.safetensors"), ev["seeds"], ev["prompts"])
    g = _gain(res, base)
    share = g["diff"] / fixed_gain if fixed_gain else None
    return {"efficient_overrides": {"steps": ecfg.steps, **overrides}, "efficient_best_step": best["step"],
            "efficient_gain": g["diff"], "efficient_gain_se": g["in_se"], "efficient_share_of_fixed_gain": share,
            "efficient_fd": ev["fd"](res["images"]), "efficient_seconds": round(time.time() - t0, 1),
            "rollouts_efficient": ecfg.steps * ecfg.rollout_batch_size,
            "rollouts_to_90pct": best["step"] * ecfg.rollout_batch_size if share is not None and share >= 0.9 else None}


def _fd_fn(ctx: dict):
    from ..backbones.digits import load_split
    from ..rewards import get_scorer

    fd = get_scorer("digits_fd", weights_dir=str(ctx["wdir"]))
    meta = (getattr(ctx["bb"], "meta", {}) or {}).get("data") or {}
    split = load_split(seed=int(meta.get("seed", 0)), upsample=int(meta.get("upsample", 1)))
    real = ((split.x_heldout + 1) / 2).clamp(0, 1).repeat(1, 3, 1, 1)
    return lambda images: float(fd.compute(images, real))


def _fixed_record(ctx: dict, trainer, best: dict, res: dict, tuned, n_eval: int, seeds) -> dict:
    rcfg, table, hist = ctx["rcfg"], ctx["table"], trainer.history
    pd = _gain(res["rdpo"], res["distilled"])
    fd_d, fd_r = res["distilled"]["fd"], res["rdpo"]["fd"]
    return {
        "best_step": best["step"], "best_selection_reward": best["reward"],
        "guard": {"metric": rcfg.guard_metric, "max_ratio": rcfg.guard_max_ratio, "start": trainer.guard_ref,
                  "best": best.get("guard")},
        "n_eval": n_eval, "eval_seeds": f"{seeds[0]}-{seeds[-1]}", "selection_seeds": f"{ctx['es'][0]}-{ctx['es'][-1]}",
        "reward_distilled": float(res["distilled"]["reward"].mean()), "reward_rdpo": float(res["rdpo"]["reward"].mean()),
        "paired_diff": pd["diff"], "paired_se": pd["se"], "paired_t": pd["t"], "paired_p": pd["p"],
        "improvement_in_se": pd["in_se"], "fixed_budget_gain_se": pd["in_se"],
        "heads_distilled": res["distilled"]["heads"], "heads_rdpo": res["rdpo"]["heads"],
        "fd_distilled": fd_d, "fd_rdpo": fd_r, "fd_ratio": fd_r / fd_d,
        "final_kl": next((h["kl"] for h in reversed(hist) if "kl" in h), None),
        "train_reward_first": next((h["mixed_reward_mean"] for h in hist if "mixed_reward_mean" in h), None),
        "train_reward_last": next((h["mixed_reward_mean"] for h in reversed(hist) if "mixed_reward_mean" in h), None),
        "rollouts_fixed": trainer.step * rcfg.rollout_batch_size,
        "eval_images_fixed": sum("eval_reward" in h for h in hist) * len(ctx["es"]),  # held-out selection images
        "table_distilled": {"positions": table.positions.tolist(), "weights": table.weights.tolist()},
        "table_rdpo": {"positions": tuned.positions.tolist(), "weights": tuned.weights.tolist()},
    }


def _checks(ctx: dict, workdir: Path, checks) -> dict:
    """``checks``: True runs the DP/preemption identities, False skips them, a path reuses their keys from a JSON
    that :func:`~epd.bench.rdpo_checks.dp_and_preempt` (or an earlier bench) wrote for the same config."""
    if checks is True:
        return dp_and_preempt(ctx, workdir)
    if not checks:
        return {}
    import json

    rec = json.loads(Path(checks).read_text())
    rec = {k: rec[k] for k in ("dp_identity_max_abs_diff", "preempt_resume_identical", "checks") if k in rec}
    rec["checks"] = {**rec.get("checks", {}), "from": str(checks)}
    return rec


RULE_OFF = {"stop_rule": "plateau", "stop_patience": 0}


def stop_rule(rcfg, given: dict | None = None) -> dict:
    """The rule the bench replays: the config's ``stop_*`` keys when its rule is on, else the plateau rule with
    patience 3 at 1 SE; keys given on the command line (``given``) replace single ones."""
    on = rcfg.stop_rule != "plateau" or rcfg.stop_patience > 0
    rule = {k: getattr(rcfg, k) for k in STOP_KEYS}
    if not on:
        rule.update(stop_patience=3, stop_min_gain_se=1.0)
    rule.update(given or {})
    make_stopper(**rule)  # bad values fail here, naming the key
    src = ("config" if on else "bench default") + (" and command line" if given else "")
    return {**{k: rule[k] for k in RECORD_KEYS[rule["stop_rule"]]}, "from": src}


def bench_rdpo(config: str, workdir: Path, weights: str | None = None, nfe: int = 5, n_eval: int = 1000,
               steps: int | None = None, stop: dict | None = None, efficient: dict | None = None,
               checks: bool | str = True, run_seeds: list[int] | None = None) -> dict:
    """The fixed-budget run is the config's RDPO for all its ``steps`` with the plateau rule off (a config that
    turns the rule on is replayed with it, see :func:`stop_rule`)."""
    from dataclasses import replace

    from ..predictor import load

    t0 = time.time()
    ctx = _prepare(config, workdir, weights, nfe)
    checked = _checks(ctx, workdir, checks)  # short runs: first, independent of the rest
    rule = stop_rule(ctx["rcfg"], stop)
    rcfg = ctx["rcfg"] = replace(ctx["rcfg"], **RULE_OFF, **({"steps": steps} if steps else {}))
    t_rdpo = time.time()
    trainer = _trainer(ctx, rcfg, workdir / "rdpo")
    best = trainer.train()
    rdpo_seconds = time.time() - t_rdpo
    tuned = load(workdir / "rdpo" / "table_best.safetensors")
    seeds, prompts = eval_set(ctx["sec"], n_eval, offset=700000)
    assert not set(seeds) & set(ctx["es"]), "evaluation seeds overlap RDPO's selection seeds"
    ev = {"seeds": seeds, "prompts": prompts, "fd": _fd_fn(ctx)}
    res = {name: _score(ctx, tab, seeds, prompts) for name, tab in (("distilled", ctx["table"]), ("rdpo", tuned))}
    for r in res.values():
        r["fd"] = ev["fd"](r["images"])
    rec = {"benchmark": "rdpo", "backbone": "digits", "config": config, "nfe": nfe, "rewards": rcfg.rewards,
           "advantage": rcfg.advantage, "steps": rcfg.steps, **_fixed_record(ctx, trainer, best, res, tuned, n_eval, seeds)}
    rec.update(_early_stop(ctx, trainer, ev, res["distilled"], res["rdpo"], rule))
    rec.update(_efficiency(ctx, workdir, EFFICIENT if efficient is None else efficient, ev, res["distilled"],
                           rec["paired_diff"]))
    if run_seeds:
        rec.update(_seed_rows(ctx, workdir, rule, ev, res["distilled"], run_seeds))
    rec.update(checked)
    rec.update({"rdpo_seconds": round(rdpo_seconds, 1), "seconds": round(time.time() - t0, 1), "machine": machine()})
    return rec


def _override(text: str) -> tuple[str, object]:
    import yaml

    from ..errors import ConfigError

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--efficient: expected KEY=VALUE (an rdpo key), got {text!r}")
    return key, yaml.safe_load(value)


def add_arguments(p):
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--weights", default=None, help="trained backbone folder (skip training)")
    p.add_argument("--workdir", default=None, help="keep (and reuse: finished runs resume) the bench's run folders")
    p.add_argument("--steps", type=int, default=None, help="override rdpo.steps")
    p.add_argument("--n-eval", type=int, default=1000)
    p.add_argument("--stop-rule", choices=STOP_RULES, default=None,
                   help="stopping rule replayed on the fixed-budget run (default: the config's when it turns one on, "
                        "else plateau with patience 3 at 1 SE); the --stop-* flags replace single rdpo.stop_* keys")
    p.add_argument("--stop-patience", type=int, default=None, help="plateau: evaluations without progress")
    p.add_argument("--stop-min-gain-se", type=float, default=None,
                   help="plateau: the least paired held-out gain, in standard errors, that counts as progress")
    p.add_argument("--stop-window", type=int, default=None, help="trend: guarded evaluations in the slope fit")
    p.add_argument("--stop-slope-se", type=float, default=None,
                   help="trend: stop when slope + this many SE of the slope <= 0")
    p.add_argument("--run-seeds", default=None,
                   help="RDPO run seeds (rdpo.seed) to replay the rule on as well, e.g. 0-4: early_stop_seeds")
    p.add_argument("--efficient", nargs="*", default=None, metavar="KEY=VALUE",
                   help=f"rdpo overrides of the one-third-budget run (default: {EFFICIENT})")
    p.add_argument("--no-checks", action="store_true", help="skip the --gpus 2 identity and preemption runs")
    p.add_argument("--checks-json", default=None, help="take those runs' keys from this earlier JSON instead")


def _stop_flags(args) -> dict:
    return {k: getattr(args, k) for k in STOP_KEYS if getattr(args, k) is not None}


def run(args):
    eff = None if args.efficient is None else dict(map(_override, args.efficient))
    with tempfile.TemporaryDirectory() as tmp:
        wd = Path(args.workdir or tmp)
        wd.mkdir(parents=True, exist_ok=True)
        rec = bench_rdpo(args.config, wd, args.weights, n_eval=args.n_eval, steps=args.steps,
                         stop=_stop_flags(args), efficient=eff,
                         checks=args.checks_json or not args.no_checks,
                         run_seeds=parse_seeds(args.run_seeds) if args.run_seeds else None)
    atomic_write_json(args.out, rec)
    print(f"reward distilled {rec['reward_distilled']:.5f} -> rdpo {rec['reward_rdpo']:.5f}: "
          f"diff {rec['paired_diff']:.5f} +- {rec['paired_se']:.5f} (p={rec['paired_p']:.2g}); "
          f"FD {rec['fd_distilled']:.3f} -> {rec['fd_rdpo']:.3f}; early stop at step {rec['early_stop_step']} "
          f"({rec['early_stop_gain_se']:.3g} SE); one-third budget: {rec['efficient_share_of_fixed_gain']:.3g} of the gain")
    return 0
