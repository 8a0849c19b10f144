"""The learned-solver peers (AMED, LD3, GITS) from identities, and LD3's gain on the analytic GMM.

* AMED with its intermediate time at the geometric midpoint and unit scale is DPM-Solver-2 (both solvers' own
  code paths, float64); AMED-Plugin with a first-order Adams-Bashforth probe is the same.
* GITS: the dynamic programme returns the path that minimises a cost (a cost that a known grid minimises, and the
  brute-force optimum over every path of a random cost); the coarse-to-fine cost equals its definition computed
  pair by pair, and is zero on a trajectory that Euler follows exactly.
* LD3: the grid parameterisation reproduces its base grid; with a zero-radius ball and a frozen grid training
  returns the base grid and its loss is the base solver's plain error against the teacher; on the GMM the learned
  grid lowers DPM-Solver++(2M)'s final error on held-out noise at equal NFE.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from epd.backbones.gmm import GMMBackbone, make_gmm
from epd.errors import ConfigError
from epd.peers import LD3Config, base_grid, search_gits, train_ld3
from epd.solvers import solve
from epd.solvers.gits import cheapest_path, euler_step_costs
from epd.solvers.ld3 import GridParameters, project_to_ball
from epd.solvers.learned import load_grid, parse_peer, save_grid
from epd.table import EPDTable

BB = GMMBackbone(make_gmm(dim=6, num_classes=2, per_class=3, seed=0, std_range=(0.1, 0.3)), guidance=2.0)
PROMPTS = ["0", "1"]


def _amed_table(N, r=0.5, c=1.0, afs=False, **meta):
    pos = torch.full((N - 1, 1), r, dtype=torch.float64)
    return EPDTable(pos, torch.ones_like(pos), scale_dir=torch.full_like(pos, c), meta={"afs": afs, **meta})


def _noise(seeds):
    return BB.noise(seeds), BB.prepare([PROMPTS[s % 2] for s in seeds])


@pytest.mark.parametrize("N", [3, 6])
def test_amed_at_the_geometric_midpoint_with_unit_scale_is_dpm2(N):
    x, cond = _noise(list(range(8)))
    sig = BB.sigmas(N).double()
    dpm2 = solve("dpm2", BB.denoiser, x, sig, cond=cond)
    amed = solve("amed", BB.denoiser, x, sig, cond=cond, table=_amed_table(N))
    plugin1 = solve("amed_plugin", BB.denoiser, x, sig, cond=cond, table=_amed_table(N, max_order=1))
    assert torch.allclose(amed.x, dpm2.x, rtol=1e-12, atol=1e-12)
    assert torch.allclose(plugin1.x, dpm2.x, rtol=1e-12, atol=1e-12)
    assert (amed.nfe, amed.forward_passes) == (dpm2.nfe, dpm2.forward_passes) and amed.nfe == 2 * (N - 1)
    # the learned parameters do act: another time or scale moves the result
    assert not torch.allclose(solve("amed", BB.denoiser, x, sig, cond=cond, table=_amed_table(N, r=0.3)).x, dpm2.x)
    assert not torch.allclose(solve("amed", BB.denoiser, x, sig, cond=cond, table=_amed_table(N, c=1.05)).x, dpm2.x)


def test_gits_returns_the_grid_that_minimises_its_cost():
    G, path = 12, [0, 2, 3, 7, 11]
    cost = torch.rand(G, G, generator=torch.Generator().manual_seed(0)) + 0.5
    for i, j in zip(path, path[1:]):
        cost[i, j] = 0.1
    cost = torch.where(torch.arange(G)[None] > torch.arange(G)[:, None], cost, torch.tensor(float("inf")))
    assert cheapest_path(cost, len(path) - 1) == path


@pytest.mark.parametrize("steps", [1, 2, 3, 5])
def test_gits_dynamic_programme_equals_brute_force(steps):
    G = 9
    cost = torch.rand(G, G, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    cost = torch.where(torch.arange(G)[None] > torch.arange(G)[:, None], cost, torch.tensor(float("inf")))
    best = min(([0, *mid, G - 1] for mid in itertools.combinations(range(1, G - 1), steps - 1)),
               key=lambda p: sum(float(cost[a, b]) for a, b in zip(p, p[1:])))
    got = cheapest_path(cost, steps)
    total = lambda p: sum(float(cost[a, b]) for a, b in zip(p, p[1:]))  # noqa: E731
    assert got[0] == 0 and got[-1] == G - 1 and len(got) == steps + 1
    assert total(got) == pytest.approx(total(best), rel=1e-12)
    with pytest.raises(ConfigError, match="fine grid"):
        cheapest_path(cost, G)


def test_gits_cost_is_its_definition_and_zero_where_euler_is_exact():
    g = torch.Generator().manual_seed(1)
    sig = BB.sigmas(7).double()
    states, slopes = torch.randn(3, 7, 4, generator=g, dtype=torch.float64), torch.randn(3, 7, 4, generator=g,
                                                                                          dtype=torch.float64)
    cost = euler_step_costs(states, slopes, sig)
    for i in range(7):
        for j in range(7):
            if j <= i:
                assert cost[i, j] == float("inf")
            else:
                want = (states[:, i] + (sig[j] - sig[i]) * slopes[:, i] - states[:, j]).norm(dim=1).mean()
                assert float(cost[i, j]) == pytest.approx(float(want), rel=1e-12)
    x0, v = torch.randn(3, 1, 4, dtype=torch.float64), torch.randn(3, 1, 4, dtype=torch.float64)
    line = x0 + sig.reshape(1, -1, 1) * v  # x(sigma) = x0 + sigma v: Euler from any point lands on the line
    finite = euler_step_costs(line, v.expand(-1, 7, -1), sig)
    assert finite[torch.isfinite(finite)].abs().max() < 1e-10


def test_gits_on_the_gmm_is_the_cheapest_subset_of_the_fine_grid():
    fine = BB.sigmas(13).double()
    grid, path = search_gits(BB, steps=4, fine=fine, seeds=list(range(6)), prompts=PROMPTS * 3, M=3,
                             teacher_solver="heun")
    assert torch.equal(grid, fine[path]) and path[0] == 0 and path[-1] == 12 and len(path) == 5
    same, _ = search_gits(BB, steps=12, fine=fine, seeds=list(range(6)), prompts=PROMPTS * 3, M=3,
                          teacher_solver="heun")
    assert torch.equal(same, fine)  # as many steps as fine intervals: the fine grid itself


@pytest.mark.parametrize("N", [3, 6])
def test_ld3_parameterisation_reproduces_its_base(N):
    base = BB.sigmas(N).double()
    assert torch.allclose(GridParameters(base)(), base, rtol=1e-12)
    offsets = torch.randn(5, 6, dtype=torch.float64) * 3
    project_to_ball(offsets, 1.0)
    assert offsets.norm(dim=1).max() <= 1.0 + 1e-12


def _teacher(seeds):
    x, cond = _noise(seeds)
    return x, solve("heun", BB.denoiser, x, BB.sigmas(201).double(), cond=cond).x, [PROMPTS[s % 2] for s in seeds]


def test_ld3_with_a_zero_ball_and_a_frozen_grid_returns_the_base_grid():
    base = base_grid(BB, "dpmpp_2m", 4)
    x, final, prompts = _teacher(list(range(16)))
    cfg = LD3Config(iterations=3, batch=16, radius=0.0, frozen_grid=True)
    grid, hist = train_ld3(BB, solver="dpmpp_2m", base=base, x_init=x, final=final, prompts=prompts, cfg=cfg)
    assert torch.allclose(grid, base, rtol=1e-12)
    plain = ((solve("dpmpp_2m", BB.denoiser, x, base, cond=BB.prepare(prompts)).x - final) ** 2).mean().item()
    assert [h["loss"] for h in hist] == pytest.approx([plain] * 3, rel=1e-9)


def test_ld3_grid_lowers_the_final_error_of_dpmpp_2m_on_the_gmm(tmp_path):
    base = base_grid(BB, "dpmpp_2m", 4)
    x, final, prompts = _teacher(list(range(64)))
    grid, _ = train_ld3(BB, solver="dpmpp_2m", base=base, x_init=x, final=final, prompts=prompts,
                        cfg=LD3Config(iterations=80, batch=32, lr=0.05, radius=0.01))
    save_grid(tmp_path / "grid.json", grid, method="ld3", solver="dpmpp_2m", nfe=4, backbone="gmm")
    rec = load_grid(tmp_path / "grid.json", backbone="gmm")
    assert torch.equal(rec["sigmas"], grid) and rec["solver"] == "dpmpp_2m" and len(grid) == len(base)
    xh, fh, ph = _teacher(list(range(1000, 1256)))  # held-out noise

    def err(sig):
        return ((solve("dpmpp_2m", BB.denoiser, xh, sig, cond=BB.prepare(ph)).x - fh) ** 2).flatten(1).sum(1)

    learned, default = err(rec["sigmas"]), err(base)
    d = learned - default
    assert d.mean() < -3 * d.std() / len(d) ** 0.5, (learned.mean(), default.mean())


def test_peer_labels():
    assert parse_peer("amed") == ("amed", "amed") and parse_peer("amed_plugin") == ("amed", "amed_plugin")
    assert parse_peer("ld3_dpmpp_2m") == ("ld3", "dpmpp_2m") and parse_peer("gits_ipndm") == ("gits", "ipndm")
    with pytest.raises(ConfigError, match="peers.solvers"):
        parse_peer("ld3_heun")


def test_peer_rows_only_where_their_solver_runs():
    from epd.config import peer_rows

    sec = {"nfes": [3], "student": {"afs": True},
           "peers": {"solvers": ["amed", "ld3_dpmpp_2m", "gits_ipndm"], "nfes": [4, 5]}}
    assert peer_rows(sec) == [("amed", 5), ("ld3_dpmpp_2m", 4), ("ld3_dpmpp_2m", 5), ("gits_ipndm", 4),
                              ("gits_ipndm", 5)]  # AMED with AFS, like EPD, reaches odd NFEs only
    assert peer_rows({"nfes": [3]}) == []


def test_sample_takes_a_learned_grid_and_refuses_conflicting_flags(tmp_path):
    from argparse import Namespace

    from epd.sample import _learned_grid_solver

    save_grid(tmp_path / "g.json", BB.sigmas(5), method="gits", solver="ipndm", nfe=4, backbone="digits")
    args = lambda **kw: Namespace(**{"sigmas": str(tmp_path / "g.json"), "predictor_path": None, "nfe": None,  # noqa: E731
                                     "steps": None, "solver": None, **kw})
    assert _learned_grid_solver(args(), {"kind": "digits"}) == "ipndm"  # the grid's base solver by default
    with pytest.raises(ConfigError, match="--sigmas: the learned grid fixes the steps"):
        _learned_grid_solver(args(nfe=5), {"kind": "digits"})
    with pytest.raises(ConfigError, match="learned on backbone 'digits', not 'sd15'"):
        _learned_grid_solver(args(), {"kind": "sd15"})
    with pytest.raises(ConfigError, match="not 'epd'"):
        _learned_grid_solver(args(solver="epd"), {"kind": "digits"})
    assert _learned_grid_solver(args(sigmas=None), {"kind": "digits"}) is None
