"""Spread EPD's parallel points over several GPUs, and shard seeds over ranks.

Point parallelism is SPMD: every rank runs the same solver loop on identical inputs (same seeds, same
conditioning, same weights). :class:`PointParallelDenoiser` wraps the denoiser; a call over ``k`` stacked points
(batch ``k * B``, point-major as :mod:`epd.solvers.epd` stacks them) is split so that rank ``r`` evaluates its
contiguous chunk of ``k / G`` points, and the full result is assembled on every rank with an all-gather. The
probe call (``k == 1``) is evaluated by every rank (the same numbers everywhere, no communication). Because the
gathered slopes are bitwise the same on every rank, the states stay identical across ranks without any
broadcast after the start; :func:`broadcast_state` makes the start identical when a caller is unsure.

Seed sharding (:func:`shard_seeds`, :func:`merge_shards`, :func:`gather_shards`) is the throughput mode: each
rank samples its own seeds, outputs are merged back into seed order.

Failure is bounded: :func:`init_point_parallel` passes ``timeout`` to ``init_process_group``, so a collective
whose peer died raises (gloo) or aborts the process (NCCL watchdog) after that many seconds instead of waiting
forever.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from .denoiser import Prepared, batch_of
from .errors import ConfigError

__all__ = ["PointParallelDenoiser", "init_point_parallel", "check_world_size", "shard_seeds", "merge_shards",
           "gather_shards", "broadcast_state", "split_points"]


def _pg_size(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _pg_rank(group) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def init_point_parallel(world_size: int, *, backend: str | None = None, rank: int | None = None,
                        timeout_s: float = 300.0, init_method: str | None = None, set_device: bool = True):
    """Join (or create) the process group for point-parallel sampling, with a bounded timeout.

    Args:
        world_size (`int`): number of ranks (one process per GPU with NCCL).
        backend (`str`, *optional*): ``"nccl"`` or ``"gloo"``; default NCCL when CUDA is available, else gloo.
        rank (`int`, *optional*): this process's rank; default ``$RANK`` (torchrun sets it).
        timeout_s (`float`): seconds a rendezvous or collective may wait for a peer before failing.
        init_method (`str`, *optional*): e.g. ``"tcp://127.0.0.1:29500"``; default ``env://``
            (``MASTER_ADDR``/``MASTER_PORT``).
        set_device (`bool`): with NCCL, bind this process to ``cuda:{local rank}``.

    Returns:
        The default process group (``None`` means the world group to ``torch.distributed`` calls).

    Raises:
        ConfigError: fewer GPUs than ``world_size`` for NCCL, a bad ``world_size`` or ``rank``, or an existing
            process group of another size.
    """
    world_size = int(world_size)
    if world_size < 1:
        raise ConfigError(f"gpus: need at least 1 rank, got {world_size}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        have = torch.cuda.device_count()
        if have < world_size:
            raise ConfigError(f"gpus: asked for {world_size} GPUs but this machine has {have} visible CUDA "
                              f"device(s) (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                              f"use --gpus {max(have, 1)} or fewer")
    if dist.is_initialized():
        check_world_size(dist.get_world_size(), world_size, what="the running process group")
        return None
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank: {rank} is outside 0..{world_size - 1}")
    if backend == "nccl" and set_device:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=init_method or "env://", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=float(timeout_s)))
    return None


def check_world_size(saved: int | None, current: int, *, what: str = "the checkpoint") -> None:
    """Refuse to resume sharded work under another number of ranks.

    Args:
        saved (`int` or None): world size recorded by ``what`` (None: nothing recorded, accepted).
        current (`int`): world size of this run.

    Raises:
        ConfigError: naming both sizes and the fix.
    """
    if saved is not None and int(saved) != int(current):
        raise ConfigError(f"world size: {what} was written with {int(saved)} rank(s) but this run has {int(current)}; "
                          f"resume with --gpus {int(saved)}, or start a fresh output folder")


def split_points(k: int, world: int, rank: int, *, uneven: str = "error") -> tuple[int, int, int]:
    """Contiguous share of ``k`` points for ``rank`` of ``world``.

    Returns:
        ``(first point, number of points, points per rank in the gather buffer)``.

    Raises:
        ConfigError: ``k`` not divisible by ``world`` unless ``uneven="pad"``.
    """
    if uneven not in ("error", "pad"):
        raise ConfigError(f"uneven: expected 'error' or 'pad', got {uneven!r}")
    if k % world:
        if uneven == "error":
            raise ConfigError(f"K={k} parallel points cannot be split evenly over G={world} ranks; use a K that is a "
                              f"multiple of {world}, another number of GPUs, or uneven='pad' (the last rank idles "
                              f"on a padded chunk)")
        per = -(-k // world)
    else:
        per = k // world
    first = min(rank * per, k)
    return first, max(0, min(per, k - first)), per


def _slice_cond(cond: Any, lo: int, hi: int, m: int, base: int) -> Any:
    """Conditioning for state rows ``lo:hi`` of a batch of ``m`` rows whose conditioning batch is ``base``."""
    if cond is None:
        return None
    c = batch_of(cond, m)
    if c == m:  # one conditioning row per state row (already repeated over the points)
        if isinstance(cond, torch.Tensor):
            return cond[lo:hi]
        if isinstance(cond, Prepared):
            return Prepared({n: t[lo:hi] for n, t in cond.tensors.items()}, cond.extra)
        raise ConfigError(f"cond: cannot split conditioning of type {type(cond).__name__} over ranks; use a Tensor "
                          f"or epd.denoiser.Prepared")
    if c == base or (m % c == 0 and lo % c == 0 and (hi - lo) % c == 0):
        return cond  # shared by every point: the adapter repeats it to the chunk
    raise ConfigError(f"cond: prepared for {c} samples, cannot serve state rows {lo}:{hi} of {m}")


class PointParallelDenoiser:
    """Evaluate the K stacked points of a denoiser call on different ranks at once.

    Args:
        inner: the :class:`~epd.denoiser.Denoiser` on this rank's device (same weights on every rank).
        group: a ``torch.distributed`` process group (default: the world group). Without an initialised
            process group, or with one rank, calls go straight to ``inner`` (the one-GPU fallback).
        batch (`int`, *optional*): images per sample ``B``. When None, ``B`` is learnt as the smallest state
            batch seen so far (the probe call); pass it when the first call of a run may be a K-point call
            (EPD with the analytic first step), otherwise that first call is evaluated whole on every rank.
        uneven (`str`): ``"error"`` (default) raises when K is not a multiple of the world size; ``"pad"``
            gives every rank ``ceil(K / G)`` points' room in the gather, the last rank(s) evaluating fewer.

    The wrapper keeps ``coords``, ``passes_per_eval`` and every other attribute of ``inner``, so
    ``epd.solvers.solve("epd", PointParallelDenoiser(D), ...)`` runs unchanged.
    """

    def __init__(self, inner: Callable, group=None, *, batch: int | None = None, uneven: str = "error"):
        if uneven not in ("error", "pad"):
            raise ConfigError(f"uneven: expected 'error' or 'pad', got {uneven!r}")
        self.inner = inner
        self.group = group
        self.world = _pg_size(group)
        self.rank = _pg_rank(group)
        self.batch = int(batch) if batch else None
        self.uneven = uneven
        self.coords = getattr(inner, "coords", "edm")
        self.passes_per_eval = int(getattr(inner, "passes_per_eval", 1))
        self._seen_batch: int | None = None
        self._slices: dict = {}
        self.gathers = 0

    def __getattr__(self, name):  # sigma_min, sigma_max, device, ... of the wrapped denoiser
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    # -- layout
    def image_batch(self, m: int) -> int:
        """``B`` for a call with ``m`` state rows."""
        if self.batch:
            return self.batch
        self._seen_batch = m if self._seen_batch is None else min(self._seen_batch, m)
        return self._seen_batch

    def plan(self, m: int, batch: int | None = None) -> tuple[int, int, int, int, int] | None:
        """``(B, k, first point, own points, points per rank)`` for a call of ``m`` rows, or None when the call
        is evaluated whole on every rank (one rank, or a single point such as the probe).

        Raises:
            ConfigError: ``k`` not a multiple of the world size (``uneven="error"``).
        """
        B = int(batch) if batch else self.image_batch(m)
        if self.world == 1 or m <= B:
            return None
        if m % B:
            raise ConfigError(f"batch: {m} state rows are not a whole number of points of {B} images")
        k = m // B
        first, own, per = split_points(k, self.world, self.rank, uneven=self.uneven)
        return B, k, first, own, per

    def local(self, x: torch.Tensor, sigma, cond=None, *, batch: int | None = None):
        """This rank's share of a call: ``(output rows of its own points or None, plan)``. With ``plan`` None
        the whole call was evaluated here and the first item is the full output."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        m = x.shape[0]
        p = self.plan(m, batch)
        if p is None:
            return self.inner(x, sigma, cond), None
        B, k, first, own, per = p
        if own == 0:
            return None, p
        lo, hi = first * B, (first + own) * B
        s = sigma[lo:hi] if sigma.dim() else sigma
        return self.inner(x[lo:hi], s, self._cond_rows(cond, lo, hi, m, B)), p

    def gather(self, part: torch.Tensor | None, plan, like: torch.Tensor) -> torch.Tensor:
        """All-gather every rank's share into the full ``(k * B, ...)`` output (same on every rank)."""
        B, k, first, own, per = plan
        rows = per * B
        shape = (rows, *like.shape[1:])
        dtype = part.dtype if part is not None else like.dtype
        if part is None or part.shape[0] != rows:
            buf = torch.zeros(shape, dtype=dtype, device=like.device)
            if part is not None:
                buf[: part.shape[0]] = part
            part = buf
        part = part.contiguous()
        self.gathers += 1
        if dist.get_backend(self.group) == "nccl":
            full = torch.empty((self.world * rows, *shape[1:]), dtype=dtype, device=part.device)
            dist.all_gather_into_tensor(full, part, group=self.group)
        else:
            chunks = [torch.empty_like(part) for _ in range(self.world)]
            dist.all_gather(chunks, part, group=self.group)
            full = torch.cat(chunks)
        return full[: k * B]

    def __call__(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        part, plan = self.local(x, sigma, cond)
        if plan is None:
            return part
        return self.gather(part, plan, x)

    def _cond_rows(self, cond, lo: int, hi: int, m: int, B: int):
        if cond is None:
            return None
        key = (id(cond), lo, hi, m)
        hit = self._slices.get(key)
        if hit is not None and hit[0] is cond:
            return hit[1]
        out = _slice_cond(cond, lo, hi, m, B)
        if len(self._slices) > 16:
            self._slices.clear()
        self._slices[key] = (cond, out)  # keeps ``cond`` alive so the id stays unique; stable objects let
        return out                       # a graphed inner skip re-copying its static conditioning


def broadcast_state(x: torch.Tensor, group=None, src: int = 0) -> torch.Tensor:
    """Make ``x`` identical on every rank (copy of rank ``src``); a no-op without a process group."""
    if _pg_size(group) > 1:
        x = x.contiguous()
        dist.broadcast(x, src=src, group=group)
    return x


# ------------------------------------------------------------------------------------------ seed sharding
def shard_seeds(seeds: Sequence[int], rank: int, world: int) -> list[int]:
    """Seeds for ``rank`` of ``world``: a strided share (``seeds[rank::world]``), balanced to one seed.

    Raises:
        ConfigError: bad ``rank``/``world`` or duplicate seeds (their outputs would collide on merge).
    """
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"rank/world: need 0 <= rank < world, got rank={rank}, world={world}")
    seeds = [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds):
        dup = sorted({s for s in seeds if seeds.count(s) > 1})
        raise ConfigError(f"seeds: duplicates {dup[:8]} would write the same output twice; give each seed once")
    return seeds[rank::world]


def merge_shards(shards: Sequence[dict], seeds: Sequence[int]) -> list:
    """Merge per-rank ``{seed: output}`` dicts back into the order of ``seeds``.

    Raises:
        ConfigError: a seed missing from every shard, or produced by two ranks.
    """
    merged: dict = {}
    for r, part in enumerate(shards):
        for s, v in part.items():
            if s in merged:
                raise ConfigError(f"seeds: seed {s} was produced by two ranks (rank {r} and an earlier one); "
                                  f"shard with epd.parallel.shard_seeds")
            merged[s] = v
    missing = [s for s in seeds if s not in merged]
    if missing:
        raise ConfigError(f"seeds: no rank produced seed(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
                          f"a rank failed or the ranks were given different seed lists")
    return [merged[s] for s in seeds]


def gather_shards(local: dict, seeds: Sequence[int], group=None) -> list:
    """All-gather every rank's ``{seed: output}`` (CPU objects) and merge them in seed order on every rank."""
    if _pg_size(group) == 1:
        return merge_shards([local], seeds)
    parts: list = [None] * _pg_size(group)
    dist.all_gather_object(parts, {s: (v.cpu() if isinstance(v, torch.Tensor) else v) for s, v in local.items()},
                           group=group)
    return merge_shards(parts, seeds)
