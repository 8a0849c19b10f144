"""Point parallelism over ranks (gloo on localhost), seed sharding, graphed samplers' eager fallback.

The analytic GMM denoiser makes every comparison exact: splitting the K points of a step over two processes must
reproduce single-process sampling to float64 rounding, and each rank must have evaluated only its own points.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from epd.backbones.gmm import GMMBackbone, make_gmm
from epd.errors import ConfigError
from epd.graphs import CUDAGraphDenoiser, GraphedEPDSampler, GraphedEulerSampler
from epd.parallel import (PointParallelDenoiser, check_world_size, gather_shards, init_point_parallel,
                          merge_shards, shard_seeds, split_points)
from epd.solvers import solve
from epd.table import uniform_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _recorder import CallRecorder  # noqa: E402

WORLD = 2
B = 3
CASES = [(2, False), (4, False), (4, True)]  # (K, analytic first step)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_Recorder = CallRecorder


def _problem():
    bb = GMMBackbone(make_gmm(dim=6, seed=3), guidance=1.5)
    return bb, bb.noise([11, 12, 13]), bb.prepare(["0", "1", "1"]), bb.sigmas(6)


def _init(rank: int, port: int, timeout_s: float):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_point_parallel(WORLD, backend="gloo", rank=rank, timeout_s=timeout_s)


def _worker(rank: int, port: int, out_dir: str):
    _init(rank, port, timeout_s=30)
    res: dict = {}
    try:
        bb, x, cond, sigmas = _problem()
        for K, afs in CASES:
            table = uniform_table(len(sigmas), K, meta={"afs": afs})
            rec = _Recorder(bb.denoiser)
            ppd = PointParallelDenoiser(rec, batch=B)
            out = solve("epd", ppd, x, sigmas, cond=cond, table=table)
            res[f"solve_{K}_{afs}"] = (out.x, out.nfe, out.forward_passes, list(rec.rows), ppd.gathers)
            rec2 = _Recorder(bb.denoiser)
            fused = GraphedEPDSampler(PointParallelDenoiser(rec2), table).run(x, sigmas, cond)
            res[f"fused_{K}_{afs}"] = (fused.x, list(rec2.rows))
        table3 = uniform_table(len(sigmas), 3)
        try:
            solve("epd", PointParallelDenoiser(bb.denoiser, batch=B), x, sigmas, cond=cond, table=table3)
            res["indivisible"] = None
        except ConfigError as e:
            res["indivisible"] = str(e)
        rec3 = _Recorder(bb.denoiser)
        padded = solve("epd", PointParallelDenoiser(rec3, batch=B, uneven="pad"), x, sigmas, cond=cond, table=table3)
        res["pad"] = (padded.x, list(rec3.rows))
        seeds = list(range(7))
        mine = shard_seeds(seeds, rank, WORLD)
        res["gathered"] = gather_shards({s: torch.full((2,), float(s * 10 + rank)) for s in mine}, seeds)
    finally:
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("pp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("K,afs", CASES)
def test_point_parallel_equals_single_process(ranks, K, afs):
    bb, x, cond, sigmas = _problem()
    table = uniform_table(len(sigmas), K, meta={"afs": afs})
    ref = solve("epd", bb.denoiser, x, sigmas, cond=cond, table=table)
    steps = len(sigmas) - 1
    for r, res in enumerate(ranks):
        xs, nfe, fwd, rows, gathers = res[f"solve_{K}_{afs}"]
        assert _rel(xs, ref.x) <= 1e-10
        assert (nfe, fwd) == (ref.nfe, ref.forward_passes)
        # each rank evaluated every probe whole (B rows) and only its K/G points (K/G * B rows) per step
        expected: list[int] = []
        for n in range(steps):
            expected += ([] if afs and n == 0 else [B]) + [K // WORLD * B]
        assert rows == expected and gathers == steps
        fused_x, fused_rows = res[f"fused_{K}_{afs}"]
        assert _rel(fused_x, ref.x) <= 1e-10
        assert fused_rows == expected
    assert torch.equal(ranks[0][f"solve_{K}_{afs}"][0], ranks[1][f"solve_{K}_{afs}"][0])  # ranks stay in lockstep


def test_indivisible_points_error_and_pad_mode(ranks):
    for res in ranks:
        msg = res["indivisible"]
        assert msg is not None and "K=3" in msg and "G=2" in msg
    bb, x, cond, sigmas = _problem()
    ref = solve("epd", bb.denoiser, x, sigmas, cond=cond, table=uniform_table(len(sigmas), 3))
    (x0, rows0), (x1, rows1) = ranks[0]["pad"], ranks[1]["pad"]
    assert _rel(x0, ref.x) <= 1e-10 and torch.equal(x0, x1)
    assert 2 * B in rows0 and 2 * B not in rows1 and rows1.count(B) == 2 * (len(sigmas) - 1)  # rank 1: 1 point


def test_seed_sharding_gathers_in_seed_order(ranks):
    for res in ranks:
        got = res["gathered"]
        assert [int(v[0]) // 10 for v in got] == list(range(7))
        assert [int(v[0]) % 10 for v in got] == [s % WORLD for s in range(7)]  # produced by the owning rank


def _dying_worker(rank: int, port: int, out_dir: str):
    _init(rank, port, timeout_s=5)
    dist.barrier()  # both ranks are up
    if rank == 1:
        os._exit(0)  # a rank that dies before the collective
    t0 = time.time()
    err = None
    try:
        ppd = PointParallelDenoiser(lambda x, s, c=None: x * 0.5, batch=1)
        ppd(torch.ones(2, 3), torch.ones(2))
    except Exception as e:  # noqa: BLE001 (any error is fine; hanging is not)
        err = type(e).__name__
    torch.save({"error": err, "seconds": time.time() - t0}, Path(out_dir) / "rank0.pt")
    # skip interpreter teardown: gloo's threads, left with a dead peer, can abort there under load ("terminate
    # called without an active exception"), after the result above is written
    os._exit(0)


def test_dead_rank_does_not_hang(tmp_path):
    mp.spawn(_dying_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    res = torch.load(tmp_path / "rank0.pt")
    assert res["error"] is not None and res["seconds"] < 30


def test_more_gpus_than_exist(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="asked for 2 GPUs but this machine has 1"):
        init_point_parallel(2, backend="nccl")


def test_split_points_and_world_checks():
    assert [split_points(4, 2, r) for r in range(2)] == [(0, 2, 2), (2, 2, 2)]
    assert [split_points(3, 2, r, uneven="pad") for r in range(2)] == [(0, 2, 2), (2, 1, 2)]
    assert split_points(3, 4, 3, uneven="pad") == (3, 0, 1)
    with pytest.raises(ConfigError, match="K=3 parallel points cannot be split evenly over G=2"):
        split_points(3, 2, 0)
    with pytest.raises(ConfigError, match="written with 2 rank"):
        check_world_size(2, 4)
    check_world_size(None, 4)
    check_world_size(2, 2)


def test_shard_and_merge_seeds():
    seeds = [5, 9, 2, 7, 1]
    shards = [shard_seeds(seeds, r, 3) for r in range(3)]
    assert sorted(sum(shards, [])) == sorted(seeds) and max(map(len, shards)) - min(map(len, shards)) <= 1
    parts = [{s: s * s for s in sh} for sh in shards]
    assert merge_shards(parts, seeds) == [s * s for s in seeds]
    with pytest.raises(ConfigError, match="no rank produced seed"):
        merge_shards(parts[:2], seeds)
    with pytest.raises(ConfigError, match="produced by two ranks"):
        merge_shards([parts[0], parts[0]], seeds)
    with pytest.raises(ConfigError, match="duplicates"):
        shard_seeds([1, 1, 2], 0, 2)


@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("afs", [False, True])
def test_graphed_samplers_match_solvers_on_cpu(K, afs):
    bb, x, cond, sigmas = _problem()
    table = uniform_table(len(sigmas), K, meta={"afs": afs})
    ref = solve("epd", bb.denoiser, x, sigmas, cond=cond, table=table)
    out = GraphedEPDSampler(CUDAGraphDenoiser(bb.denoiser), table).run(x, sigmas, cond)
    assert torch.equal(out.x, ref.x)  # same arithmetic, term for term
    assert (out.nfe, out.forward_passes, out.paper_nfe) == (ref.nfe, ref.forward_passes, ref.paper_nfe)
    ref_e = solve("euler", bb.denoiser, x, sigmas, cond=cond)
    out_e = GraphedEulerSampler(bb.denoiser).run(x, sigmas, cond)
    assert torch.equal(out_e.x, ref_e.x) and out_e.forward_passes == ref_e.forward_passes
