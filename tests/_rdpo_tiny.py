"""A small RDPO problem on the analytic GMM backbone, for the stopping, data-parallel and preemption tests.

The reward is per image (no batch interaction), so a rank scoring a shard gives the same numbers as one process
scoring the whole batch.
"""

from __future__ import annotations

import torch

from epd.backbones.gmm import GMMBackbone, make_gmm
from epd.rdpo.trainer import RDPOConfig, RDPOTrainer
from epd.table import uniform_table

TINY = dict(rollout_batch_size=16, rloo_k=4, minibatch_size=4, ppo_epochs=2, steps=8, eval_interval=2,
            save_interval=2, learning_rate=3e-3, kl_coef=0.1, entropy_coef=0.01, dirichlet_concentration=30.0,
            rewards={"digits_alignment": 1.0})


class TargetReward:
    """``-mean((x - 0.3)^2)`` per image; ``hook(prompts)`` runs before scoring (tests use it to send signals)."""

    def __init__(self, hook=None):
        self.hook = hook

    def __call__(self, images, prompts):
        if self.hook is not None:
            self.hook(prompts)
        r = -(images.flatten(1).double() - 0.3).pow(2).mean(1)
        return r, {"target": r}


def tiny_trainer(out, rank: int = 0, world: int = 1, preempt=None, reward=None, shard_update=False,
                 **overrides) -> RDPOTrainer:
    cfg = RDPOConfig(**{**TINY, **overrides})
    bb = GMMBackbone(make_gmm(dim=4, num_classes=2, per_class=1, seed=0))
    return RDPOTrainer(bb, uniform_table(4, 2, meta={"afs": False}), bb.sigmas(4), reward or TargetReward(),
                       ["0", "1"], ["0", "1"], list(range(100, 140)), cfg, out, rank=rank, world=world,
                       preempt=preempt, shard_update=shard_update)


def table_bytes(out) -> dict:
    return {f.name: f.read_bytes() for f in sorted(out.glob("table_*"))}


_ = torch
