"""Solver identities, NFE accounting, schedules and argument checks."""

import math

import numpy as np
import pytest
import torch

from epd.backbones.gmm import GMMDenoiser, make_gmm, reference_solution
from epd.errors import ConfigError, NonFiniteError
from epd.schedules import discrete_vp, edm_polynomial, logsnr, time_uniform, vp_spacing
from epd.solvers import SOLVERS, TABLE_POINTS, TABLE_SOLVERS, solve, steps_for_nfe
from epd.table import EPDTable, uniform_table



pytestmark = pytest.mark.usefixtures("float64_default")  # compare in float64 (tests/conftest.py)

GMM = make_gmm(dim=6, num_classes=3, per_class=2, seed=1)
DEN = GMMDenoiser(GMM, guidance=2.0)
COND = torch.arange(5) % 3


def _x(seed=0, sigma=80.0):
    return torch.randn(5, 6, generator=torch.Generator().manual_seed(seed)) * sigma


def _table(pos, w, n, **kw):
    return EPDTable(torch.tensor(pos).expand(n, -1), torch.tensor(w).expand(n, -1), **kw)


# --------------------------------------------------------------------------- EPD identities
def test_epd_k1_r1_equals_euler():
    sig = edm_polynomial(6, 0.002, 80)
    # r -> 1 puts the single point at sigma_{n+1}: the probe lands where Euler lands, and the step uses the
    # slope there, so with r = 1 - 1e-12 the EPD step equals Euler with the slope evaluated at the end point.
    # The exact algebraic identity is r = 0: the point is sigma_n itself and EPD reduces to Euler.
    t0 = _table([[1e-12]], [[1.0]], 5)
    epd = solve("epd", DEN, _x(), sig, cond=COND, table=t0).x
    euler = solve("euler", DEN, _x(), sig, cond=COND).x
    assert torch.allclose(epd, euler, rtol=1e-9, atol=1e-9)


def test_epd_k1_r1_is_euler_probe_then_end_slope():
    """r = 1: y = Euler(x); x' = x + h * slope(y, sigma_next) — one step by hand."""
    sig = torch.tensor([10.0, 2.0])
    x = _x(1, 10.0)
    h = sig[1] - sig[0]
    d = (x - DEN(x, sig[0].expand(5), COND)) / sig[0]
    y = x + h * d
    g = (y - DEN(y, sig[1].expand(5), COND)) / sig[1]
    expected = x + h * g
    out = solve("epd", DEN, x, sig, cond=COND, table=_table([[1 - 1e-15]], [[1.0]], 1)).x
    assert torch.allclose(out, expected, rtol=1e-10)


def test_epd_k1_half_equals_log_midpoint_dpm2():
    sig = edm_polynomial(7, 0.002, 80)
    epd = solve("epd", DEN, _x(2), sig, cond=COND, table=_table([[0.5]], [[1.0]], 6)).x
    dpm2 = solve("dpm2", DEN, _x(2), sig, cond=COND).x
    assert torch.allclose(epd, dpm2, rtol=1e-12, atol=1e-12)


def test_epd_two_points_by_hand():
    """One K=2 step with scales, computed from the formula of spec §3.2."""
    sig = torch.tensor([5.0, 1.5])
    r, w, c, a = torch.tensor([0.3, 0.8]), torch.tensor([0.25, 0.75]), torch.tensor([1.02, 0.97]), torch.tensor([0.95, 1.04])
    table = EPDTable(r[None], w[None], c[None], a[None])
    x = _x(3, 5.0)
    t, tn = sig
    d = (x - DEN(x, t.expand(5), COND)) / t
    acc = 0
    for k in range(2):
        s_k = tn ** r[k] * t ** (1 - r[k])
        y = x + (s_k - t) * d
        acc = acc + w[k] * c[k] * (y - DEN(y, (a[k] * s_k).expand(5), COND)) / s_k
    expected = x + (tn - t) * acc
    out = solve("epd", DEN, x, sig, cond=COND, table=table)
    assert torch.allclose(out.x, expected, rtol=1e-12)
    assert out.nfe == 2 and out.forward_passes == (1 + 2) * 2


def test_epd_batched_equals_sequential_points():
    sig = edm_polynomial(5, 0.002, 80)
    g = torch.Generator().manual_seed(0)
    seg = torch.distributions.Dirichlet(torch.ones(4)).sample((4,))
    w = torch.distributions.Dirichlet(torch.ones(3)).sample((4,))
    table = EPDTable.from_segments(seg, w, scale_dir=1 + 0.05 * torch.rand(4, 3, generator=g),
                                   scale_time=1 + 0.05 * torch.rand(4, 3, generator=g))
    a = solve("epd", DEN, _x(4), sig, cond=COND, table=table, parallel=True)
    b = solve("epd", DEN, _x(4), sig, cond=COND, table=table, parallel=False)
    assert torch.allclose(a.x, b.x, rtol=1e-13, atol=1e-13)
    assert a.nfe == 8 and b.nfe == 4 + 4 * 3  # one batched call per step vs K calls
    assert a.forward_passes == b.forward_passes == 4 * (1 + 3) * 2


def test_epd_plugin_ipndm_first_step_equals_epd_and_history_used():
    sig = edm_polynomial(5, 0.002, 80)
    t = uniform_table(5, 2)
    one_a = solve("epd", DEN, _x(5), sig[:2], cond=COND, table=uniform_table(2, 2)).x
    one_b = solve("epd_ipndm", DEN, _x(5), sig[:2], cond=COND, table=uniform_table(2, 2)).x
    assert torch.allclose(one_a, one_b)
    full_a = solve("epd", DEN, _x(5), sig, cond=COND, table=t).x
    full_b = solve("epd_ipndm", DEN, _x(5), sig, cond=COND, table=t).x
    assert not torch.allclose(full_a, full_b)


def test_epd_afs_replaces_first_eval():
    sig = edm_polynomial(4, 0.002, 80)
    t = uniform_table(4, 2, meta={"afs": True})
    out = solve("epd", DEN, _x(6), sig, cond=COND, table=t)
    assert out.nfe == 5 and out.paper_nfe == 5 and out.forward_passes == (3 * 3 - 1) * 2
    # first step by hand with d = x / sqrt(1 + sigma^2)
    x, (s0, s1) = _x(6), sig[:2]
    d = x / torch.sqrt(1 + s0**2)
    acc = 0
    for r, w in zip(t.positions[0], t.weights[0]):
        sk = s1**r * s0 ** (1 - r)
        y = x + (sk - s0) * d
        acc = acc + w * (y - DEN(y, sk.expand(5), COND)) / sk
    first = solve("epd", DEN, _x(6), sig[:2], cond=COND, table=uniform_table(2, 2, meta={"afs": True}))
    assert torch.allclose(first.x, x + (s1 - s0) * acc, rtol=1e-12) and first.nfe == 1


@pytest.mark.parametrize("N,K,afs,nfe,passes", [(11, 2, False, 20, 30), (9, 2, False, 16, 24), (4, 2, True, 5, 8)])
def test_nfe_accounting_shipped_configs(N, K, afs, nfe, passes):
    """SD1.5/SD3 N=11 K=2 -> paper NFE 20, 30 forward-equivalents (x2 with CFG); FLUX N=9 K=2 -> 16 / 24."""
    den = GMMDenoiser(GMM, guidance=1.0)
    out = solve("epd", den, _x(7), edm_polynomial(N, 0.002, 80), cond=COND,
                table=uniform_table(N, K, meta={"afs": afs}))
    assert (out.paper_nfe, out.forward_passes) == (nfe, passes)
    cfg = solve("epd", DEN, _x(7), edm_polynomial(N, 0.002, 80), cond=COND, table=uniform_table(N, K, meta={"afs": afs}))
    assert cfg.forward_passes == 2 * passes and cfg.paper_nfe == nfe


@pytest.mark.parametrize("name,nfe,steps", [("euler", 5, 6), ("heun", 6, 4), ("epd", 5, 4), ("epd", 20, 11)])
def test_steps_for_nfe(name, nfe, steps):
    assert steps_for_nfe(name, nfe, afs=(nfe % 2 == 1)) == steps


# --------------------------------------------------------------------------- accuracy
def test_dpmpp_3m_exact_beats_diffusers_variant_order():
    """The third-order D2 coefficient converges at order ~3; diffusers' coefficient at ~2 (see docstring)."""
    x = _x(8)
    ref, _ = reference_solution(DEN, x, 80, 0.05, COND)
    errs = {}
    for name in ("dpmpp_3m", "dpmpp_3m_diffusers"):
        e = [float((solve(name, DEN, x, edm_polynomial(n + 1, 0.05, 80), cond=COND,
                          lower_order_final=False).x - ref).norm()) for n in (64, 128)]
        errs[name] = math.log2(e[0] / e[1])
    assert errs["dpmpp_3m"] > 2.7 and errs["dpmpp_3m_diffusers"] < 2.3


@pytest.mark.parametrize("name,order", [("euler", 1), ("heun", 2), ("unipc", 3), ("ipndm_v", 4)])
def test_convergence_orders(name, order):
    x = _x(9)
    ref, _ = reference_solution(DEN, x, 80, 0.05, COND)
    kw = {"lower_order_final": False} if name == "unipc" else {}
    e = [float((solve(name, DEN, x, edm_polynomial(n + 1, 0.05, 80), cond=COND, **kw).x - ref).norm())
         for n in (96, 192)]
    assert abs(math.log2(e[0] / e[1]) - order) < 0.35


def test_reference_solution_matches_closed_form_single_gaussian():
    """x(sigma) = mu + (x0 - mu) sqrt((s^2 + sigma^2) / (s^2 + sigma0^2)) for one Gaussian."""
    from epd.backbones.gmm import GMM

    g = GMM(torch.full((1, 3), 0.4), torch.tensor([0.7]), torch.ones(1), torch.zeros(1, dtype=torch.long))
    den = GMMDenoiser(g)
    x = _x(10)[:, :3]
    ref, _ = reference_solution(den, x, 80.0, 0.01)
    exact = 0.4 + (x - 0.4) * math.sqrt((0.49 + 1e-4) / (0.49 + 6400))
    assert torch.allclose(ref, exact, rtol=1e-9, atol=1e-11)


# --------------------------------------------------------------------------- schedules (spec §2 vectors)
def test_schedule_vectors_spec():
    sd15_10 = [14.6146, 7.8399, 4.6092, 2.9183, 1.9502, 1.3449, 0.9324, 0.6250, 0.3687, 0.0292]
    sd15_11 = [14.61464, 8.30717, 5.09241, 3.32507, 2.27973, 1.61558, 1.16287, 0.83188, 0.57119, 0.34371, 0.02917]
    np.testing.assert_allclose(discrete_vp(10).numpy(), sd15_10, atol=1e-4)
    np.testing.assert_allclose(discrete_vp(11).numpy(), sd15_11, atol=1e-5)
    np.testing.assert_allclose(time_uniform(3, 0.002, 80).numpy(), [80, 2.8237, 0.002], atol=1e-4)
    np.testing.assert_allclose(time_uniform(4, 0.002, 80).numpy(), [80, 6.9503, 1.2867, 0.002], atol=1e-4)


def test_schedule_shapes_and_endpoints():
    for s in (edm_polynomial(7), logsnr(7), time_uniform(7)):
        assert len(s) == 7 and torch.all(s[1:] < s[:-1])
        assert math.isclose(float(s[0]), 80, rel_tol=1e-12) and math.isclose(float(s[-1]), 0.002, rel_tol=1e-9)
    ts, sig = vp_spacing(10, spacing="leading")
    assert ts.tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    ts, _ = vp_spacing(10, spacing="trailing")
    assert ts.tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("sig", [[80.0, 90.0, 1.0], [80.0, -1.0], [80.0], [80.0, float("nan")], [1.0, 1.0]])
def test_bad_sigmas_rejected(sig):
    with pytest.raises(ConfigError, match="sigmas"):
        solve("euler", DEN, _x(), torch.tensor(sig), cond=COND)


def test_unknown_solver_lists_names():
    with pytest.raises(ConfigError, match="accepted"):
        solve("rk45", DEN, _x(), edm_polynomial(3), cond=COND)


def test_epd_table_checks():
    with pytest.raises(ConfigError, match="increasing"):
        EPDTable(torch.tensor([[0.6, 0.4]]), torch.tensor([[0.5, 0.5]]))
    with pytest.raises(ConfigError, match="sum to 1"):
        EPDTable(torch.tensor([[0.4, 0.6]]), torch.tensor([[0.5, 0.6]]))
    with pytest.raises(ConfigError, match="K >= 1"):
        EPDTable(torch.zeros(3, 0), torch.zeros(3, 0))
    with pytest.raises(ConfigError, match=r"\(0, 1\)"):
        EPDTable(torch.tensor([[0.0, 0.6]]), torch.tensor([[0.5, 0.5]]))
    with pytest.raises(ConfigError, match="num_steps"):
        solve("epd", DEN, _x(), edm_polynomial(5), cond=COND, table=uniform_table(4, 2))
    with pytest.raises(ConfigError, match="num_points"):
        uniform_table(4, 0)


def test_nan_in_denoiser_reported_with_step():
    def bad(x, s, c):
        out = DEN(x, s, c)
        return out * float("nan") if float(s.reshape(-1)[0]) < 10 else out

    sig = edm_polynomial(6)
    first_bad = int((sig < 10).nonzero()[0])
    with pytest.raises(NonFiniteError, match=f"step {first_bad} "):
        solve("euler", bad, _x(), sig, cond=COND)


def test_every_registered_solver_runs_deterministically():
    sig = edm_polynomial(5, 0.002, 80)
    for name in SOLVERS:
        kw = {"table": uniform_table(5, TABLE_POINTS.get(name, 2))} if name in TABLE_SOLVERS else {}
        a, b = solve(name, DEN, _x(), sig, cond=COND, **kw).x, solve(name, DEN, _x(), sig, cond=COND, **kw).x
        assert torch.equal(a, b) and torch.isfinite(a).all()
