"""``epd rdpo``: Stage-2 RDPO fine-tuning of an EPD table (see :mod:`epd.rdpo.trainer`).

``--gpus G`` runs G data-parallel processes (:mod:`epd.rdpo.ranks`); under ``torchrun`` (``RANK`` and
``WORLD_SIZE`` set) the command joins that process group instead of spawning. SIGTERM or SIGUSR1 makes the run
checkpoint after the current step and exit with 143 or 138 (:mod:`epd.rdpo.preempt`); the same command resumes.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError, EPDError


def add_arguments(p):
    p.add_argument("--config", required=True)
    p.add_argument("--backbone", required=True)
    p.add_argument("--init", required=True, help="start table (Stage-1 output, native or .pkl)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics.jsonl, table_best/final)")
    p.add_argument("--weights", default=None, help="trained backbone folder (embedded backbone)")
    p.add_argument("--steps", type=int, default=None, help="override rdpo.steps")
    p.add_argument("--device", default="cpu")
    p.add_argument("--gpus", type=int, default=1,
                   help="data-parallel processes, one per GPU (with --device cpu: gloo ranks on the CPU); the global "
                        "batch and the result do not depend on it")
    p.add_argument("--shard-update", action="store_true",
                   help="with --gpus > 1: split each PPO minibatch over the ranks and all-reduce the gradients (default: "
                        "every rank computes the small policy update itself, identical to one process bit for bit)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a rank waits for a dead peer (--gpus > 1)")


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


def _resolved_config(args, table, rcfg) -> None:
    from dataclasses import asdict

    import yaml

    from ..io import atomic_write_text

    resolved = {"run": {"seed": rcfg.seed, "run_dir": str(Path(args.out).resolve())},
                "data": {"predictor_snapshot": str(Path(args.init).resolve()), "prompt_csv": None},
                "model": {k: v for k, v in table.meta.items() if isinstance(v, (str, int, float, bool, type(None)))},
                "reward": {"multi": {"weights": rcfg.rewards}},
                "ppo": asdict(rcfg), "logging": {"save_interval": rcfg.save_interval, "log_interval": rcfg.log_interval}}
    atomic_write_text(Path(args.out) / "resolved_config.yaml", yaml.safe_dump(resolved, sort_keys=False))


def _train(args, rank: int = 0, world: int = 1, device: str | None = None) -> int:
    """This process's part of the run; returns the exit status (0, or 128 + signal after a preemption)."""
    import contextlib
    from dataclasses import asdict

    from .. import tracking
    from ..config import load_config
    from ..solvers import paper_nfe
    from .preempt import PreemptSignal, exit_code
    from .trainer import RDPOTrainer

    cfg = load_config(args.config)
    with PreemptSignal() as preempt:  # from the start: a signal during setup is honoured after the first step
        bb, table, sigmas, reward, tp, ep, es, rcfg = setup(cfg, args.backbone, args.init, args.weights,
                                                            device or args.device)
        if args.steps is not None:
            rcfg.steps = args.steps
        Path(args.out).mkdir(parents=True, exist_ok=True)
        if rank == 0:
            _resolved_config(args, table, rcfg)
        tags = {"init": args.init, "nfe": paper_nfe("epd", table.num_steps, table.meta.get("afs")), "gpus": world,
                "table_best": str(Path(args.out) / "table_best.safetensors")}
        with (tracking.start_run("rdpo", backbone=args.backbone, params=asdict(rcfg), tags=tags) if rank == 0
              else contextlib.nullcontext(tracking.Run(None))) as r:
            trainer = RDPOTrainer(bb, table, sigmas, reward, tp, ep, es, rcfg, args.out, rank=rank, world=world,
                                  run=r, guard=make_guard(rcfg, args.weights, device or args.device), preempt=preempt,
                                  shard_update=getattr(args, "shard_update", False))
            best = trainer.train()
            if trainer.preempted:
                r.tags({"preempted_at_step": trainer.step})
                return exit_code(trainer.preempted)
            r.metrics({"best_eval_reward": best["reward"], "best_step": best["step"]})
            r.artifact(Path(args.out) / "metrics.jsonl")
    if rank == 0:
        print(f"RDPO done: best held-out reward {best['reward']:.5g} at step {best['step']} -> {args.out}/table_best")
    return 0


def _rank_main(rank: int, args, world: int, rendezvous: str, queue) -> None:
    import torch
    import torch.distributed as dist

    from ..parallel import init_point_parallel

    cuda = str(args.device).startswith("cuda")
    init_point_parallel(world, backend="nccl" if cuda else "gloo", rank=rank, timeout_s=args.timeout,
                        init_method=f"file://{rendezvous}")
    try:
        torch.set_num_threads(max(1, torch.get_num_threads() // world))
        queue.put((rank, _train(args, rank, world, f"cuda:{rank}" if cuda else args.device)))
    finally:
        dist.destroy_process_group()


def _spawn(args, world: int) -> int:
    """Run ``world`` ranks; SIGTERM/SIGUSR1 sent to this process are passed on to them. Returns the largest
    exit status a rank reported (143/138 after a preemption)."""
    import signal
    import tempfile

    import torch.multiprocessing as mp

    from .preempt import PREEMPT_SIGNALS

    queue = mp.get_context("spawn").SimpleQueue()
    with tempfile.TemporaryDirectory(prefix="epd-rdpo-ranks-") as tmp:
        ctx = mp.start_processes(_rank_main, args=(args, world, str(Path(tmp) / "rendezvous"), queue),
                                 nprocs=world, join=False, start_method="spawn")
        forward = lambda signum, frame: [os.kill(p.pid, signum) for p in ctx.processes if p.is_alive()]  # noqa: E731
        old = {s: signal.signal(s, forward) for s in PREEMPT_SIGNALS}
        try:
            while not ctx.join(timeout=1.0):
                pass
        except mp.ProcessRaisedException as e:
            raise EPDError(f"--gpus {world}: a rank failed:\n{e}") from None
        except mp.ProcessExitedException as e:
            raise EPDError(f"--gpus {world}: a rank died ({e}); the others stopped at the next collective") from None
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    codes = dict(queue.get() for _ in range(world))
    return max(codes.values())


def run(args):
    if args.steps is not None and args.steps < 1:
        raise ConfigError("--steps: must be >= 1")
    if args.gpus < 1:
        raise ConfigError(f"--gpus: must be >= 1, got {args.gpus}")
    env_world = int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1
    if env_world > 1:  # launched by torchrun: join its process group
        from ..parallel import init_point_parallel

        cuda = str(args.device).startswith("cuda")
        init_point_parallel(env_world, backend="nccl" if cuda else "gloo", timeout_s=args.timeout)
        local = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else args.device
        return _train(args, int(os.environ["RANK"]), env_world, local)
    if args.gpus > 1:
        import torch

        if str(args.device).startswith("cuda") and torch.cuda.device_count() < args.gpus:
            raise ConfigError(f"--gpus: asked for {args.gpus} GPUs but {torch.cuda.device_count()} are visible; "
                              f"use --gpus {max(torch.cuda.device_count(), 1)} or fewer")
        return _spawn(args, args.gpus)
    return _train(args)
