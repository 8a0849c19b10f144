"""Data parallelism for RDPO: the collectives the trainer needs, and ``--gpus G`` worker processes.

Every rank draws the *global* rollout batch's prompts, latent seeds and sampled tables from the same generators
(cheap), then rolls out and scores only its contiguous shard of images (the expensive part: denoiser, decoder,
reward models). Rewards are all-gathered, so advantages are computed over the global batch exactly as on one
process. The policy update is tiny next to the rollouts; by default every rank computes it on the whole minibatch,
which keeps the ranks and the one-process run identical bit for bit. With ``--shard-update`` each PPO minibatch is
split over the ranks instead: each rank's loss is its share of the minibatch mean and the gradients are
all-reduced (summed) before clipping and the AdamW step (every rank still applies the same update; float32
summation order makes it differ from one process by rounding). The held-out evaluation is sharded like the
rollouts. Only rank 0 writes files and logs to MLflow.

Launch: ``epd rdpo --gpus G`` spawns G workers (NCCL, one GPU each, with ``--device cuda``; gloo on the CPU with
``--device cpu``). Under ``torchrun`` (``WORLD_SIZE``/``RANK`` set) ``epd rdpo`` joins that process group instead.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["Ranks"]


class Ranks:
    """Rank ``rank`` of ``world``; every method is a no-op (or identity) on one process."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = int(rank), int(world)
        nccl = self.world > 1 and dist.is_initialized() and dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items (the last ranks get one fewer when uneven)."""
        per, extra = divmod(n, self.world)
        lo = self.rank * per + min(self.rank, extra)
        return slice(lo, lo + per + (self.rank < extra))

    def cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``t`` (shards may differ in length) in rank order, on every rank."""
        if self.world == 1:
            return t
        parts: list = [None] * self.world
        dist.all_gather_object(parts, t.detach().cpu())
        return torch.cat(parts).to(t.device)

    def sum_grads(self, params) -> None:
        """All-reduce (sum) the gradients of ``params``; a missing gradient counts as zeros."""
        if self.world == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of a list of numbers over the ranks."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().tolist()

    def max_int(self, value: int) -> int:
        """Largest ``value`` over the ranks (e.g. a preemption signal seen by any of them)."""
        if self.world == 1:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()
