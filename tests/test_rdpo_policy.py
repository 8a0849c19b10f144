"""RDPO policy: cold start, architecture (against the original checkpoints), log-probs/entropies/KL against
closed forms and torch.distributions, sampling, per-image tables in the EPD solver."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch.distributions import Dirichlet, LogNormal

from epd.errors import ConfigError, EPDError
from epd.legacy import load_legacy_pickle
from epd.rdpo.policy import EPDParamPolicy, PolicyAction, SampledTables, cold_start, sanitize_rows
from epd.solvers import solve
from epd.table import EPDTable, uniform_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import FIXTURES as FIX, needs  # noqa: E402

SMOKE_SD15 = FIX / "rlepd/smoke/20260329-162229/runs/20260329-162308-smoke_sd15/checkpoints/policy-step000010.pt"
needs_fixtures = needs(str(SMOKE_SD15.relative_to(FIX)), "rlepd/predictors")


def _table(scales=True, steps=4, K=2, seed=0) -> EPDTable:
    g = torch.Generator().manual_seed(seed)
    seg = torch.distributions.Dirichlet(torch.full((K + 1,), 4.0)).sample((steps - 1,))
    w = torch.softmax(torch.randn(steps - 1, K, generator=g, dtype=torch.float64), 1)
    sc = (lambda: 1 + 0.05 * torch.rand(steps - 1, K, generator=g, dtype=torch.float64)) if scales else (lambda: None)
    return EPDTable.from_segments(seg.double(), w, scale_dir=sc(), scale_time=sc(), meta={"afs": False})


def _perturbed(policy: EPDParamPolicy, seed=1, scale=0.05) -> EPDParamPolicy:
    """Move the (zero-initialised) output layer so residuals of order 0.5 appear, as after some training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.output_linear.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return policy


# ---------------------------------------------------------------------- cold start
@needs_fixtures
def test_cold_start_example_from_spec():
    """spec §5.5: c = 20 on r = [0.335, 0.665] gives rows log(20 [0.335, 0.330, 0.335]) and log 10."""
    table = load_legacy_pickle(FIX / "rlepd/predictors/fake-sd15-11/network-snapshot-000005.pkl")
    base = cold_start(table, 20.0)
    assert base.base_log_alpha_pos.shape == (10, 3) and base.base_log_alpha_weight.shape == (10, 2)
    for row in base.base_log_alpha_pos.tolist():
        assert row == pytest.approx([1.9021, 1.8871, 1.9021], abs=5e-5)
        assert row == pytest.approx([math.log(6.7), math.log(6.6), math.log(6.7)], abs=1e-6)
    assert torch.allclose(base.base_log_alpha_weight, torch.full((10, 2), math.log(10.0)), atol=1e-6)
    assert base.base_log_scale_dir is None  # the table's scale ranges are 0 -> no heads


@needs_fixtures
def test_cold_start_matches_original_checkpoint_buffers():
    """The original SD1.5 smoke run (c = 20, both scale heads forced, std 0.05) from its start table."""
    table = load_legacy_pickle(FIX / "rlepd/smoke/20260329-162229/fake/f15/network-snapshot-000005.pkl")
    sd = torch.load(SMOKE_SD15, weights_only=True)
    base = cold_start(table, 20.0, train_scale_dir=True, train_scale_time=True, scale_std=0.05)
    for name, value in base.buffers().items():
        assert torch.allclose(value, sd[name], atol=1e-6, rtol=0), name


def test_sanitize_sorts_separates_and_reports():
    p = torch.tensor([[0.6, 0.2], [0.3, 0.3 + 1e-9], [0.0, 1.0], [0.2, 0.7]], dtype=torch.float64)
    w = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.5, 0.5], [0.4, 0.6]], dtype=torch.float64)
    s = sanitize_rows(p, w)
    assert s.reordered == [0] and s.adjusted == [1, 2]
    assert s.positions[0].tolist() == [0.2, 0.6] and s.weights[0].tolist() == [0.1, 0.9]
    assert (torch.diff(s.positions, dim=1) >= 1e-6 - 1e-15).all()
    assert s.positions[2].tolist() == pytest.approx([1e-6, 1 - 1e-6], abs=1e-15)
    assert s.positions[3].tolist() == [0.2, 0.7]


def test_degenerate_rows_fall_back_to_uniform():
    t = EPDTable(torch.tensor([[1e-9, 0.5], [0.3, 0.6]]), torch.tensor([[1 - 1e-9, 1e-9], [0.5, 0.5]]))
    base = cold_start(t, 10.0)
    assert base.fallback_rows == (0,)
    assert torch.allclose(base.base_log_alpha_pos[0], torch.full((3,), math.log(10 / 3)), atol=1e-6)
    assert torch.allclose(base.base_log_alpha_weight[0], torch.full((2,), math.log(5.0)), atol=1e-6)
    assert base.base_log_alpha_pos[1].tolist() == pytest.approx([math.log(3.0), math.log(3.0), math.log(4.0)], abs=1e-6)


@pytest.mark.parametrize("scales", [False, True])
def test_initial_mean_equals_start_table(scales):
    table = _table(scales=scales, steps=6, K=3)
    policy = EPDParamPolicy.from_table(table, 12.0)
    mean = policy.mean_table()
    assert torch.allclose(mean.positions, table.positions, atol=1e-7, rtol=0)
    assert torch.allclose(mean.weights, table.weights, atol=1e-7, rtol=0)
    if scales:  # log-normal mean = c * exp(sigma^2 / 2) with sigma = 0.05
        assert torch.allclose(mean.scale_dir, table.scale_dir * math.exp(0.05 ** 2 / 2), atol=1e-6, rtol=0)
    else:
        assert mean.scale_dir is None and mean.scale_time is None
    assert float(policy.kl_to_base().detach()) == pytest.approx(0.0, abs=1e-6)


def test_untrained_scales_stay_at_the_start_table():
    """``train_scale_dir/time=False`` on a table with scales: no heads, and every sampled table and the mean keep
    the start's scales (they used to fall back to 1, which moved digits-FD by 25 % for a 2 % scale change)."""
    table = _table(scales=True, steps=6, K=3)
    policy = EPDParamPolicy.from_table(table, 12.0, train_scale_dir=False, train_scale_time=False)
    assert policy.heads == ()
    mean = policy.mean_table()
    for name in ("positions", "weights", "scale_dir", "scale_time"):
        assert torch.allclose(getattr(mean, name), getattr(table, name).double(), atol=1e-7, rtol=0), name
    act = policy.sample(4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(act.scale_dir, table.scale_dir.float().expand(4, -1, -1))
    assert torch.equal(act.scale_time, table.scale_time.float().expand(4, -1, -1))
    torch.testing.assert_close(policy.log_prob(act), EPDParamPolicy.from_table(
        EPDTable(table.positions, table.weights), 12.0).log_prob(act), rtol=1e-6, atol=1e-5)


# ---------------------------------------------------------------------- architecture
@needs_fixtures
def test_state_dict_keys_and_strict_round_trip():
    sd = torch.load(SMOKE_SD15, weights_only=True)
    policy = EPDParamPolicy.from_state_dict(sd)
    assert list(policy.state_dict()) == list(sd)
    assert policy.describe() == {"num_steps": 4, "num_points": 2, "hidden_dim": 128, "num_layers": 2,
                                 "scale_heads": ["dir", "time"], "context_dim": None, "output_dim": 13}
    fresh = EPDParamPolicy.from_table(load_legacy_pickle(
        FIX / "rlepd/smoke/20260329-162229/fake/f15/network-snapshot-000005.pkl"), 20.0,
        train_scale_dir=True, train_scale_time=True)
    assert {k: tuple(v.shape) for k, v in fresh.state_dict().items()} == {k: tuple(v.shape) for k, v in sd.items()}
    fresh.load_state_dict(sd, strict=True)


def _manual_params(sd: dict, K: int) -> dict:
    """The spec §6.3 network written out with plain tensor ops from a state dict."""
    h = sd["step_embed.weight"].double()
    i = 0
    while f"blocks.{i}.linear.weight" in sd:
        ln = torch.nn.functional.layer_norm(h, (h.shape[1],), sd[f"blocks.{i}.layer_norm.weight"].double(),
                                            sd[f"blocks.{i}.layer_norm.bias"].double(), eps=1e-5)
        h = h + torch.nn.functional.silu(ln) @ sd[f"blocks.{i}.linear.weight"].double().T \
            + sd[f"blocks.{i}.linear.bias"].double()
        i += 1
    delta = h @ sd["output_linear.weight"].double().T + sd["output_linear.bias"].double()
    out = {"alpha_pos": torch.exp(sd["base_log_alpha_pos"].double() + delta[:, :K + 1]),
           "alpha_weight": torch.exp(sd["base_log_alpha_weight"].double() + delta[:, K + 1:2 * K + 1])}
    at = 2 * K + 1
    for n in ("dir", "time"):
        if f"base_log_scale_{n}" in sd:
            out[f"loc_{n}"] = sd[f"base_log_scale_{n}"].double() + delta[:, at:at + K]
            out[f"log_std_{n}"] = (sd[f"base_log_std_{n}"].double() + delta[:, at + K:at + 2 * K]).clamp(-7, 2)
            at += 2 * K
    return out


@needs_fixtures
def test_params_equal_manual_forward_of_original_checkpoint():
    sd = torch.load(SMOKE_SD15, weights_only=True)
    policy = EPDParamPolicy.from_state_dict(sd).double()
    want = _manual_params(sd, 2)
    got = policy()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-10, rtol=1e-10), k


def test_from_state_dict_errors_name_the_problem():
    sd = EPDParamPolicy.from_table(_table(scales=False), 10.0).state_dict()
    bad = dict(sd)
    bad["output_linear.weight"] = torch.zeros(13, 128)
    with pytest.raises(EPDError, match="output_linear.weight"):
        EPDParamPolicy.from_state_dict(bad, "ckpt.pt")
    with pytest.raises(EPDError, match="not an EPD policy"):
        EPDParamPolicy.from_state_dict({"weight": torch.zeros(1)}, "ckpt.pt")


# ---------------------------------------------------------------------- log-probs, entropies, KL
def _dirichlet_logpdf(x, a):
    return (torch.lgamma(a.sum(-1)) - torch.lgamma(a).sum(-1) + ((a - 1) * torch.log(x)).sum(-1))


def _dirichlet_entropy(a):
    a0, k = a.sum(-1), a.shape[-1]
    return (torch.lgamma(a).sum(-1) - torch.lgamma(a0) + (a0 - k) * torch.digamma(a0)
            - ((a - 1) * torch.digamma(a)).sum(-1))


@pytest.mark.parametrize("scales", [False, True])
def test_log_prob_entropy_kl_equal_closed_forms(scales):
    policy = _perturbed(EPDParamPolicy.from_table(_table(scales=scales), 15.0,
                                                  train_scale_dir=scales or None)).double()
    action = policy.sample(64, generator=torch.Generator().manual_seed(3))
    p = policy()
    lp = (_dirichlet_logpdf(action.segments, p["alpha_pos"]).sum(-1)
          + _dirichlet_logpdf(action.weights, p["alpha_weight"]).sum(-1))
    ent = _dirichlet_entropy(p["alpha_pos"]).sum() + _dirichlet_entropy(p["alpha_weight"]).sum()
    torch_lp = Dirichlet(p["alpha_pos"]).log_prob(action.segments).sum(-1) \
        + Dirichlet(p["alpha_weight"]).log_prob(action.weights).sum(-1)
    for n in policy.heads:
        mu, sd = p[f"loc_{n}"], torch.exp(p[f"log_std_{n}"])
        x = getattr(action, f"scale_{n}")
        lp = lp + (-torch.log(x * sd * math.sqrt(2 * math.pi)) - (torch.log(x) - mu) ** 2 / (2 * sd ** 2)).sum((-2, -1))
        ent = ent + (mu + 0.5 * torch.log(2 * math.pi * math.e * sd ** 2)).sum()
        torch_lp = torch_lp + LogNormal(mu, sd).log_prob(x).sum((-2, -1))
    assert set(policy.heads) == ({"dir", "time"} if scales else set())
    got = policy.log_prob(action)
    assert got.shape == (64,)
    assert torch.allclose(got, lp, atol=1e-6, rtol=0) and torch.allclose(got, torch_lp, atol=1e-6, rtol=0)
    assert float(policy.entropy().detach()) == pytest.approx(float(ent.detach()), abs=1e-6)
    # KL(Dir(a) || Dir(b)) closed form + normal KL of the log-scales
    b = policy.base_distributions()
    kl = 0.0
    for a, a0 in ((p["alpha_pos"], b.positions.concentration), (p["alpha_weight"], b.weights.concentration)):
        kl += (torch.lgamma(a.sum(-1)) - torch.lgamma(a).sum(-1) - torch.lgamma(a0.sum(-1)) + torch.lgamma(a0).sum(-1)
               + ((a - a0) * (torch.digamma(a) - torch.digamma(a.sum(-1, keepdim=True)))).sum(-1)).sum()
    for n in policy.heads:
        base = getattr(b, f"scale_{n}")
        m1, s1, m0, s0 = p[f"loc_{n}"], torch.exp(p[f"log_std_{n}"]), base.loc, base.scale
        kl += (torch.log(s0 / s1) + (s1 ** 2 + (m1 - m0) ** 2) / (2 * s0 ** 2) - 0.5).sum()
    got_kl = float(policy.kl_to_base().detach())
    assert got_kl == pytest.approx(float(kl.detach()), abs=1e-6) and got_kl > 1e-2


def test_log_prob_gradient_reaches_the_network_and_ratio_is_one():
    policy = EPDParamPolicy.from_table(_table(scales=True), 10.0)
    action = policy.sample(8, generator=torch.Generator().manual_seed(0))
    old = policy.log_prob(action).detach()
    new = policy.log_prob(action)
    assert torch.equal(torch.exp(new - old), torch.ones(8))
    (-new.mean()).backward()
    assert policy.output_linear.weight.grad.abs().sum() > 0  # zero-initialised layer still gets gradient
    assert policy.base_log_alpha_pos.grad is None and not policy.base_log_alpha_pos.requires_grad


# ---------------------------------------------------------------------- sampling
def test_samples_are_valid_tables_and_reproducible():
    policy = _perturbed(EPDParamPolicy.from_table(_table(scales=True, steps=7, K=3), 8.0))
    state = torch.get_rng_state()
    a = policy.sample(256, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    b = policy.sample(256, generator=torch.Generator().manual_seed(5))
    c = policy.sample(256, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.positions, b.positions) and torch.equal(a.scale_time, b.scale_time)
    assert not torch.equal(a.positions, c.positions)
    assert a.positions.shape == (256, 6, 3) and a.segments.shape == (256, 6, 4)
    assert (torch.diff(a.positions, dim=-1) > 0).all() and (a.positions > 0).all() and (a.positions < 1).all()
    assert torch.allclose(a.weights.sum(-1), torch.ones(256, 6), atol=1e-6) and (a.weights > 0).all()
    assert torch.allclose(torch.cumsum(a.segments, -1)[..., :-1], a.positions)
    assert (a.scale_dir > 0).all() and not a.positions.requires_grad


def test_sample_moments_match_the_distributions():
    policy = _perturbed(EPDParamPolicy.from_table(_table(scales=True), 12.0)).double()
    n = 20000
    a = policy.sample(n, generator=torch.Generator().manual_seed(11))
    p = policy()
    for x, alpha in ((a.segments, p["alpha_pos"]), (a.weights, p["alpha_weight"])):
        a0 = alpha.sum(-1, keepdim=True)
        mean, var = alpha / a0, alpha * (a0 - alpha) / (a0 ** 2 * (a0 + 1))
        assert ((x.mean(0) - mean).abs() < 5 * (var / n).sqrt()).all()
    mu, sd = p["loc_dir"], torch.exp(p["log_std_dir"])
    ln_mean, ln_var = torch.exp(mu + sd ** 2 / 2), (torch.exp(sd ** 2) - 1) * torch.exp(2 * mu + sd ** 2)
    assert ((a.scale_dir.mean(0) - ln_mean).abs() < 5 * (ln_var / n).sqrt()).all()
    m = policy.mean_table()  # the exported mean is the distributions' mean
    assert torch.allclose(m.positions, torch.cumsum(p["alpha_pos"] / p["alpha_pos"].sum(-1, keepdim=True), -1)[:, :-1])
    assert torch.allclose(m.scale_dir, ln_mean)


def test_action_indexing_and_concatenation():
    policy = EPDParamPolicy.from_table(_table(scales=True), 10.0)
    a = policy.sample(6, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([4, 1])
    sub = a[idx]
    assert torch.equal(sub.positions, a.positions[idx]) and torch.equal(sub.scale_dir, a.scale_dir[idx])
    assert torch.allclose(policy.log_prob(sub), policy.log_prob(a)[idx])
    assert torch.equal(PolicyAction.cat([a[:2], a[2:]]).weights, a.weights)


# ---------------------------------------------------------------------- per-image tables in the solver
def _gauss_denoiser(x, sigma, cond=None):
    """Exact denoiser of N(0, I) data: D = x / (1 + sigma^2)."""
    return x / (1 + sigma.reshape(-1, *([1] * (x.dim() - 1))) ** 2)


def test_sampled_tables_run_one_table_per_image():
    policy = _perturbed(EPDParamPolicy.from_table(_table(scales=True, steps=5), 6.0)).double()
    action = policy.sample(3, generator=torch.Generator().manual_seed(2))
    tables = action.tables({"afs": False})
    assert isinstance(tables, SampledTables) and tables.num_steps == 5
    x = 10 * torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = torch.tensor([10.0, 3.0, 1.0, 0.3, 0.05], dtype=torch.float64)
    out = solve("epd", _gauss_denoiser, x, sigmas, table=tables).x
    for i in range(3):
        single = solve("epd", _gauss_denoiser, x[i:i + 1], sigmas, table=tables.table(i)).x
        assert torch.allclose(out[i:i + 1], single, atol=1e-12, rtol=0)
    other = solve("epd", _gauss_denoiser, x[:1], sigmas, table=tables.table(1)).x
    assert not torch.allclose(out[:1], other, atol=1e-6)


# ---------------------------------------------------------------------- prompt context
def test_context_conditioning():
    policy = EPDParamPolicy.from_table(_table(scales=False), 10.0, context_dim=5)
    ctx = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    p0 = policy(context=ctx)
    assert p0["alpha_pos"].shape == (4, 3, 3)
    assert torch.allclose(p0["alpha_pos"], policy()["alpha_pos"].expand(4, -1, -1))  # zero output layer
    _perturbed(policy)
    p1 = policy(context=ctx)
    assert not torch.allclose(p1["alpha_pos"][0], p1["alpha_pos"][1])
    a = policy.sample(4, generator=torch.Generator().manual_seed(0), context=ctx)
    assert policy.log_prob(a, context=ctx).shape == (4,) and policy.entropy(context=ctx).shape == (4,)
    back = EPDParamPolicy.from_state_dict(policy.state_dict())
    assert back.context_dim == 5 and torch.allclose(back(context=ctx)["alpha_pos"], p1["alpha_pos"])
    with pytest.raises(ConfigError, match="context"):
        EPDParamPolicy.from_table(_table(scales=False), 10.0)(context=ctx)


def test_bad_cold_start_arguments():
    with pytest.raises(ConfigError, match="dirichlet_concentration"):
        cold_start(uniform_table(4, 2), 0.0)
    with pytest.raises(ConfigError, match="scale_std"):
        cold_start(uniform_table(4, 2), 10.0, train_scale_dir=True, scale_std=0.0)
