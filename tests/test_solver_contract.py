"""The contract every registered solver keeps (one shared test, parametrized over ``epd.solvers.SOLVERS``).

On the analytic GMM backbone: the paper-NFE count the solver reports is the registry's (:func:`epd.solvers.paper_nfe`)
and the denoiser was called that many times; forward passes count every parallel point and the CFG doubling, as
the network saw them; the callback runs once per step with the documented keys; the trajectory has one state per
grid point; the input dtype is kept; two runs are bitwise equal; only table solvers take (and need) a table.
Solver accuracy and parity with diffusers are tested in test_solvers_core.py and test_solvers_parity.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from epd.backbones.gmm import GMMDenoiser, make_gmm
from epd.errors import ConfigError
from epd.schedules import edm_polynomial
from epd.solvers import SOLVERS, TABLE_POINTS, TABLE_SOLVERS, paper_nfe, solve, steps_for_nfe
from epd.table import uniform_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _recorder import CallRecorder  # noqa: E402

NAMES = sorted(SOLVERS)
B, N, K = 4, 6, 2  # images, grid points, points per EPD step (AMED's tables have one: TABLE_POINTS)
STEPS = N - 1
COND = torch.tensor([0, 1, 2, 1])
SIGMAS = edm_polynomial(N, 0.002, 80.0)
BASE_KEYS = {"i", "x", "sigma", "sigma_next"}
STEP_KEYS = {"denoised"}  # baselines: the step's denoised estimate
EPD_KEYS = {"points"}  # table solvers: the K intermediate noise levels, (B, K)
# (solver, analytic first step): AFS matters to table solvers only
WITH_AFS = [(n, afs) for n in NAMES for afs in ((False, True) if n in TABLE_SOLVERS else (False,))]


_Calls = CallRecorder


def _denoiser(guidance: float = 2.0):
    """A GMM denoiser (CFG doubles its batch when ``guidance != 1``) and the rows its mixture evaluated."""
    gmm = make_gmm(dim=6, num_classes=3, per_class=2, seed=1)
    network_rows: list[int] = []
    exact = gmm.denoise

    def denoise(x, sigma, label=None):
        network_rows.append(x.shape[0])
        return exact(x, sigma, label)

    gmm.denoise = denoise
    return _Calls(GMMDenoiser(gmm, guidance)), network_rows


def _x(dtype=torch.float64):
    return (torch.randn(B, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80.0).to(dtype)


def _k(name):
    return TABLE_POINTS.get(name, K)


def _run(name, den, x=None, *, afs=False, **kw):
    if name in TABLE_SOLVERS:
        kw.setdefault("table", uniform_table(N, _k(name), meta={"afs": afs}))
    return solve(name, den, _x() if x is None else x, SIGMAS, cond=COND, **kw)


@pytest.mark.parametrize("name,afs", WITH_AFS)
def test_paper_nfe_is_the_registry_count(name, afs):
    den, _ = _denoiser()
    out = _run(name, den, afs=afs)
    assert out.paper_nfe == paper_nfe(name, N, afs)
    assert out.nfe == len(den.rows) == out.paper_nfe  # EPD's K points run in one call: counted once
    assert steps_for_nfe(name, out.paper_nfe, afs) == N


@pytest.mark.parametrize("guidance", [1.0, 2.0])
@pytest.mark.parametrize("name,afs", WITH_AFS)
def test_forward_passes_count_points_and_cfg(name, afs, guidance):
    den, network_rows = _denoiser(guidance)
    out = _run(name, den, afs=afs)
    cfg = 2 if guidance != 1.0 else 1
    if name in TABLE_SOLVERS:
        probes = STEPS - int(afs)
        k = _k(name)
        assert den.rows == [B] * (1 - int(afs)) + [k * B] + [B, k * B] * (STEPS - 1)
        assert out.forward_passes == (probes + k * STEPS) * cfg
    else:
        assert set(den.rows) == {B}
        assert out.forward_passes == out.nfe * cfg
    assert sum(network_rows) == out.forward_passes * B  # what the network evaluated, CFG doubling included


@pytest.mark.parametrize("name", NAMES)
def test_callback_once_per_step_with_documented_keys(name):
    den, _ = _denoiser()
    seen: list[dict] = []
    out = _run(name, den, callback=seen.append)
    assert [info["i"] for info in seen] == list(range(STEPS))
    keys = BASE_KEYS | (EPD_KEYS if name in TABLE_SOLVERS else STEP_KEYS)
    assert all(set(info) == keys for info in seen)
    for i, info in enumerate(seen):
        assert float(info["sigma"]) == pytest.approx(float(SIGMAS[i]), rel=1e-15)
        assert float(info["sigma_next"]) == pytest.approx(float(SIGMAS[i + 1]), rel=1e-15)
        if name in TABLE_SOLVERS:
            assert info["points"].shape == (B, _k(name))
    assert torch.equal(seen[-1]["x"], out.x)


@pytest.mark.parametrize("name", NAMES)
def test_trajectory_has_every_grid_point(name):
    den, _ = _denoiser()
    x = _x()
    out = _run(name, den, x, return_trajectory=True)
    assert len(out.trajectory) == STEPS + 1
    assert torch.equal(out.trajectory[0], x) and torch.equal(out.trajectory[-1], out.x)
    assert _run(name, den, x).trajectory == []  # only when asked for


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", NAMES)
def test_dtype_kept_and_deterministic(name, dtype):
    den, _ = _denoiser()
    a = _run(name, den, _x(dtype), return_trajectory=True)
    b = _run(name, den, _x(dtype), return_trajectory=True)
    assert a.x.dtype == dtype and all(t.dtype == dtype for t in a.trajectory)
    assert torch.isfinite(a.x).all()
    assert torch.equal(a.x, b.x) and all(torch.equal(s, t) for s, t in zip(a.trajectory, b.trajectory))


@pytest.mark.parametrize("name", NAMES)
def test_table_only_for_table_solvers(name):
    den, _ = _denoiser()
    table = uniform_table(N, _k(name))
    if name in TABLE_SOLVERS:
        with pytest.raises(ConfigError, match="table"):
            solve(name, den, _x(), SIGMAS, cond=COND)
        with pytest.raises(ConfigError, match="table"):
            SOLVERS[name](den, _x(), SIGMAS, cond=COND)
    else:  # a baseline ignores a table: solve() drops it, the sampling function accepts and ignores it
        plain = solve(name, den, _x(), SIGMAS, cond=COND).x
        assert torch.equal(solve(name, den, _x(), SIGMAS, cond=COND, table=table).x, plain)
        assert torch.equal(SOLVERS[name](den, _x(), SIGMAS, cond=COND, table=table).x, plain)


@pytest.mark.parametrize("name", NAMES)
def test_denoise_to_zero_costs_one_evaluation(name):
    den, _ = _denoiser()
    out = _run(name, den, denoise_to_zero=True)
    assert out.paper_nfe == paper_nfe(name, N) + 1 == out.nfe


@pytest.mark.parametrize("name", sorted(TABLE_POINTS))
def test_fixed_point_count_is_enforced(name):
    """A solver whose table has a fixed K (AMED: one point a step) refuses a table with another K, naming the field."""
    den, _ = _denoiser()
    with pytest.raises(ConfigError, match="num_points"):
        solve(name, den, _x(), SIGMAS, cond=COND, table=uniform_table(N, TABLE_POINTS[name] + 1))
