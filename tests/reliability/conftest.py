"""Shared set-up of the reliability suite: networking off, a tiny trained digits backbone, a config with a GMM
and a digits backbone, two fork servers (different hash seeds) and the uninterrupted reference run of every
stage."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from . import offline
from .forkserver import ForkServer
from .harness import STAGES, Workspace


@pytest.fixture(scope="package", autouse=True)
def no_network():
    """Every test of this package runs with IPv4/IPv6 sockets and name lookups refused."""
    offline.install()
    offline.ATTEMPTS.clear()
    yield
    attempts = list(offline.ATTEMPTS)
    offline.uninstall()
    assert not attempts, f"code attempted network access during the reliability suite: {attempts}"


@pytest.fixture(scope="package", autouse=True)
def one_thread():
    """One torch thread, as in the CLI runs (2-core machines shared with other jobs slow down 5x otherwise)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="package")
def ws(tmp_path_factory, one_thread) -> Workspace:
    """Config, prompt files, a trained tiny digits backbone and an RDPO start table."""
    root = tmp_path_factory.mktemp("reliability")
    with torch.random.fork_rng(devices=[]):
        return Workspace.create(root)


@pytest.fixture(scope="package")
def servers(tmp_path_factory):
    """Two fork servers: ``ref`` runs the uninterrupted references, ``kill`` the runs that get killed and resumed."""
    d = tmp_path_factory.mktemp("forkservers")
    ref, kill = ForkServer(d / "ref.log", hash_seed=11), ForkServer(d / "kill.log", hash_seed=22)
    threads = [threading.Thread(target=s.ready) for s in (ref, kill)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in (ref, kill):
        hello = s.ready()
        assert hello["threads"] == 1, f"fork server is multi-threaded after its imports ({hello}); forking is unsafe"
    yield {"ref": ref, "kill": kill}
    ref.close()
    kill.close()


@pytest.fixture(scope="package")
def refs(ws, servers, tmp_path_factory):
    """``refs(stage) -> Path``: the uninterrupted reference output of a stage (computed once, on ``ref``)."""
    root = tmp_path_factory.mktemp("refs")
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            stage = STAGES[name]
            for dep in stage.needs:
                get(dep)
            out = root / name
            child = servers["ref"].run(stage.argv(ws, out, done), root / f"{name}-run", ws.root)
            assert child.exitcode == 0, f"reference {name} failed:\n{child.err()[-3000:]}"
            done[name] = out
            ws.ref_seconds[name] = child.seconds
        return done[name]

    return get
