"""``epd rdpo``: Stage-2 RDPO fine-tuning of an EPD table (see :mod:`epd.rdpo.trainer`)."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError


def add_arguments(p):
    p.add_argument("--config", required=True)
    p.add_argument("--backbone", required=True)
    p.add_argument("--init", required=True, help="start table (Stage-1 output, native or .pkl)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics.jsonl, table_best/final)")
    p.add_argument("--weights", default=None, help="trained backbone folder (embedded backbone)")
    p.add_argument("--steps", type=int, default=None, help="override rdpo.steps")
    p.add_argument("--device", default="cpu")


def setup(cfg: dict, backbone_name: str, init: str, weights: str | None, device: str = "cpu"):
    """Everything a trainer needs from a config: backbone, start table, grid, reward, prompt sets, config."""
    from ..backbones import load_backbone
    from ..config import backbone_section
    from ..io import parse_seeds
    from ..predictor import load
    from ..prompts import resolve_prompts
    from ..study import resolve_grid
    from ..table import check_compatible
    from .trainer import MultiReward, RDPOConfig

    sec = backbone_section(cfg, backbone_name)
    rsec = dict(sec.get("rdpo") or {})
    eval_sec = rsec.pop("eval", {}) or {}
    rcfg = RDPOConfig.from_dict(rsec)
    table = load(init)
    check_compatible(table, backbone=sec.get("kind", backbone_name))
    bb = load_backbone(sec, device=device, weights_dir=weights)
    sigmas = resolve_grid(bb, "epd", table=table)
    prompts = sec.get("prompts") or {}
    train_prompts = resolve_prompts(prompts.get("train", "builtin:digits"))
    eval_prompts = resolve_prompts(eval_sec.get("prompts") or prompts.get("heldout") or prompts.get("train",
                                                                                                      "builtin:digits"))
    eval_seeds = parse_seeds(eval_sec.get("seeds", "50000-50255"))
    reward = MultiReward(rcfg.rewards, weights_dir=weights, device=device)
    return bb, table, sigmas, reward, train_prompts, eval_prompts, eval_seeds, rcfg


def make_guard(rcfg, weights: str | None, device: str = "cpu"):
    """The checkpoint-selection guard named by ``rdpo.guard_metric`` (a set metric, lower is better), or None."""
    if not rcfg.guard_metric:
        return None
    from ..rewards import get_scorer, scorer_kind

    if scorer_kind(rcfg.guard_metric) != "set":
        raise ConfigError(f"rdpo.guard_metric: {rcfg.guard_metric!r} is not a set metric (e.g. digits_fd)")
    scorer = get_scorer(rcfg.guard_metric, weights_dir=weights, device=device)
    if rcfg.guard_metric != "digits_fd":
        raise ConfigError("rdpo.guard_metric: only digits_fd has a built-in reference set; others need fid_ref")
    from ..backbones import backbone_class

    ref = scorer.features(backbone_class(scorer.backbone).heldout_reference(weights))
    return lambda images: scorer.compute(scorer.features(images), ref)


def run(args):
    from .. import tracking
    from ..config import load_config
    from ..solvers import paper_nfe
    from .trainer import RDPOTrainer

    cfg = load_config(args.config)
    bb, table, sigmas, reward, tp, ep, es, rcfg = setup(cfg, args.backbone, args.init, args.weights, args.device)
    if args.steps is not None:
        if args.steps < 1:
            raise ConfigError("--steps: must be >= 1")
        rcfg.steps = args.steps
    from dataclasses import asdict

    import yaml

    from ..io import atomic_write_text

    Path(args.out).mkdir(parents=True, exist_ok=True)
    resolved = {"run": {"seed": rcfg.seed, "run_dir": str(Path(args.out).resolve())},
                "data": {"predictor_snapshot": str(Path(args.init).resolve()), "prompt_csv": None},
                "model": {k: v for k, v in table.meta.items() if isinstance(v, (str, int, float, bool, type(None)))},
                "reward": {"multi": {"weights": rcfg.rewards}},
                "ppo": asdict(rcfg), "logging": {"save_interval": rcfg.save_interval, "log_interval": rcfg.log_interval}}
    atomic_write_text(Path(args.out) / "resolved_config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    with tracking.start_run("rdpo", backbone=args.backbone, params=asdict(rcfg),
                            tags={"init": args.init, "nfe": paper_nfe("epd", table.num_steps, table.meta.get("afs")),
                                  "table_best": str(Path(args.out) / "table_best.safetensors")}) as r:
        trainer = RDPOTrainer(bb, table, sigmas, reward, tp, ep, es, rcfg, args.out, run=r,
                              guard=make_guard(rcfg, args.weights, args.device))
        best = trainer.train()
        r.metrics({"best_eval_reward": best["reward"], "best_step": best["step"]})
        r.artifact(Path(args.out) / "metrics.jsonl")
    print(f"RDPO done: best held-out reward {best['reward']:.5g} at step {best['step']} -> {args.out}/table_best")
    return 0
