"""Data-parallel RDPO: two gloo processes on the CPU give the one-process tables (same global batch) to 1e-6."""

from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp

from _rdpo_tiny import tiny_trainer
from epd.errors import ConfigError
from epd.predictor import load
from epd.rdpo.ranks import Ranks

pytestmark = pytest.mark.usefixtures("one_thread")


def _worker(rank: int, world: int, out: str, rendezvous: str, shard_update: bool) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        tiny_trainer(out, rank=rank, world=world, shard_update=shard_update).train()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("shard_update, tol", [(False, 0.0), (True, 1e-5)])
def test_two_processes_match_one(tmp_path, shard_update, tol):
    """Replicated update (default): bit for bit. Sharded minibatches with all-reduced gradients: float32 summation
    order only (the tiny problem's learning rate is 3x digits', so rounding grows faster than there)."""
    one = tiny_trainer(tmp_path / "one")
    one.train()
    mp.start_processes(_worker, args=(2, str(tmp_path / "two"), str(tmp_path / "rdv"), shard_update), nprocs=2,
                       join=True, start_method="spawn")
    diff = 0.0
    for name in ("table_best", "table_final"):
        a, b = load(tmp_path / "one" / f"{name}.safetensors"), load(tmp_path / "two" / f"{name}.safetensors")
        for k, v in a.tensors().items():
            diff = max(diff, float((v - b.tensors()[k]).abs().max()))
    assert diff <= tol
    h1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    h2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(h1, h2, strict=True):  # the gathered rewards and the summed statistics agree too
        for k in ("mixed_reward_mean", "eval_reward", "policy_loss", "ratio", "clip_fraction"):
            if k in a:
                assert b[k] == (a[k] if tol == 0 else pytest.approx(a[k], rel=1e-3)), k
    assert json.loads((tmp_path / "two" / "stop.json").read_text())["selected_step"] == one.best["step"]


def test_shards_cover_the_batch_in_order_and_too_many_ranks_are_refused(tmp_path):
    for n in (7, 8, 16):
        for world in (1, 2, 3):
            parts = [list(range(n))[Ranks(r, world).shard(n)] for r in range(world)]
            assert sum(parts, []) == list(range(n)) and max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ConfigError, match="--gpus 5: .*minibatch_size=4"):
        tiny_trainer(tmp_path, rank=0, world=5, shard_update=True)
    with pytest.raises(ConfigError, match="--gpus 41: .*held-out seeds \\(40\\)"):
        tiny_trainer(tmp_path, rank=0, world=41)
