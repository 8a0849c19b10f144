"""Digits backbone: prompts, data split, the CFG denoiser contract (K stacked points), noise, grids, images."""

from __future__ import annotations

import pytest
import torch

from epd.backbones.base import Backbone
from epd.denoiser import Denoiser, repeat_cond
from epd.backbones.digits import (NULL_CLASS, PROMPTS, DigitsBackbone, build_net, edm_sigmas, load_split,
                                  parse_prompt, parse_prompts, to_base_resolution)
from epd.errors import ConfigError, EPDError
from epd.solvers import solve


def _random_net(seed: int = 0, **arch):
    """A small net with every parameter random (the zero-initialised output layers would hide the labels)."""
    torch.manual_seed(seed)
    net = build_net({"channels": 8, "emb_dim": 16, **arch})
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    return net.eval()


@pytest.fixture(scope="module")
def net():
    return _random_net()



pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------- prompts
@pytest.mark.parametrize("text,label", [
    ("7", 7), ("seven", 7), ("Seven", 7), ("a handwritten digit seven", 7), ("A Handwritten Digit Seven.", 7),
    ("digit 7", 7), ("  digit   seven ", 7), ("a handwritten digit 0", 0), ("the digit nine", 9), ("number 3", 3),
    ("zero", 0), ("handwritten digit one", 1),
])
def test_parse_prompt_accepts_documented_forms(text, label):
    assert parse_prompt(text) == label


@pytest.mark.parametrize("text", ["eleven", "10", "a cat", "", "digit", "77", "a handwritten letter a", "-1"])
def test_parse_prompt_rejects_others_listing_accepted_forms(text):
    with pytest.raises(EPDError, match="accepted forms: '7', 'seven', 'digit 7'"):
        parse_prompt(text)


def test_canonical_prompts_round_trip():
    assert parse_prompts(PROMPTS).tolist() == list(range(10))
    assert parse_prompts("3").tolist() == [3]


# ---------------------------------------------------------------------- data
def test_split_is_seeded_stratified_disjoint_and_scaled():
    a, b, c = load_split(0), load_split(0), load_split(1)
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.x_train, c.x_train)
    assert len(a.x_train) == 1500 and len(a.x_heldout) == 297
    assert a.x_train.min() == -1 and a.x_train.max() == 1 and a.x_train.shape[1:] == (1, 8, 8)
    counts = torch.bincount(torch.cat([a.y_train, a.y_heldout]))
    assert counts.tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # the bundled set
    stratified = counts.double() * 297 / counts.sum()
    assert (torch.bincount(a.y_heldout) - stratified).abs().max() < 1
    flat_tr = {tuple(r) for r in a.x_train.flatten(1).tolist()}
    overlap = sum(tuple(r) in flat_tr for r in a.x_heldout.flatten(1).tolist())
    assert overlap <= 1  # the bundled set holds at most a duplicate image or two


def test_upsampling_is_nearest_and_invertible():
    a, up = load_split(0), load_split(0, upsample=2)
    assert up.x_train.shape[-1] == 16
    assert torch.equal(up.x_train[:, :, ::2, ::2], a.x_train)
    assert torch.allclose(to_base_resolution((up.x_train + 1) / 2), a.x_train, atol=1e-6)
    with pytest.raises(ConfigError, match="upsample"):
        load_split(0, upsample=0)


# ---------------------------------------------------------------------- denoiser contract
def _backbone(net, w):
    return DigitsBackbone(net, {}, guidance=w)


def test_protocols(net):
    bb = _backbone(net, 1.5)
    assert isinstance(bb, Backbone) and isinstance(bb.denoiser, Denoiser)
    assert bb.coords == bb.denoiser.coords == "edm"
    assert (bb.sigma_min, bb.sigma_max, bb.default_schedule) == (0.002, 80.0, "edm")


def test_cfg_identities(net):
    x, sigma = torch.randn(6, 1, 8, 8), torch.tensor([0.01, 0.1, 0.5, 1.0, 5.0, 40.0])
    labels = torch.tensor([0, 1, 2, 7, 8, 9])
    with torch.no_grad():
        cond = net(x, sigma, labels)
        uncond = net(x, sigma, torch.full((6,), NULL_CLASS))
    assert not torch.allclose(cond, uncond)
    d1, d0, d25 = (_backbone(net, w).denoiser for w in (1.0, 0.0, 2.5))
    assert torch.equal(d1(x, sigma, labels), cond)
    assert torch.equal(d0(x, sigma, labels), uncond)
    torch.testing.assert_close(d25(x, sigma, labels), uncond + 2.5 * (cond - uncond), rtol=1e-5, atol=1e-5)
    assert torch.equal(d1(x, sigma, None), uncond)  # no conditioning: unconditional model
    assert (d1.passes_per_eval, d0.passes_per_eval, d25.passes_per_eval) == (1, 1, 2)


@pytest.mark.parametrize("w", [1.0, 2.0])
def test_k_stacked_call_equals_separate_calls(net, w):
    D = _backbone(net, w).denoiser
    B, K = 4, 3
    labels = torch.tensor([3, 1, 4, 1])
    xs = [torch.randn(B, 1, 8, 8, generator=torch.Generator().manual_seed(k)) for k in range(K)]
    sig = [torch.full((B,), s) for s in (0.3, 1.1, 7.0)]
    separate = torch.cat([D(xs[k], sig[k], labels) for k in range(K)])
    stacked = D(torch.cat(xs), torch.cat(sig), labels)
    pre_repeated = D(torch.cat(xs), torch.cat(sig), repeat_cond(labels, K))
    torch.testing.assert_close(stacked, separate, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pre_repeated, separate, rtol=1e-5, atol=1e-5)
    scalar = D(xs[0], torch.tensor(0.3), labels)
    torch.testing.assert_close(scalar, D(xs[0], sig[0], labels), rtol=0, atol=0)


def test_bad_labels_are_rejected(net):
    D = _backbone(net, 2.0).denoiser
    x, s = torch.randn(2, 1, 8, 8), torch.ones(2)
    with pytest.raises(EPDError, match="label 10 out of range"):
        D(x, s, torch.tensor([1, 10]))
    with pytest.raises(EPDError, match="out of range"):
        D(x, s, torch.tensor([-1, 2]))
    with pytest.raises(EPDError, match="integer"):
        D(x, s, torch.tensor([1.0, 2.0]))
    with pytest.raises(EPDError, match="do not divide"):
        D(torch.randn(3, 1, 8, 8), torch.ones(3), torch.tensor([1, 2]))


def test_denoiser_keeps_dtype_and_passes_input_gradients(net):
    D = _backbone(net, 1.0).denoiser
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    out = D(x, torch.ones(2), torch.tensor([1, 2]))
    assert out.dtype == torch.float64
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in net.parameters())


# ---------------------------------------------------------------------- noise, grid, images
def test_noise_is_per_seed(net):
    bb = _backbone(net, 1.0)
    n = bb.noise([3, 5])
    assert n.shape == (2, 1, 8, 8)
    torch.testing.assert_close(n[1], torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(5)) * 80.0,
                               rtol=0, atol=0)
    assert torch.equal(bb.noise([5])[0], n[1])


def test_edm_grid_matches_formula(net):
    bb = _backbone(net, 1.0)
    s = bb.sigmas(6)
    assert s.dtype == torch.float64 and s[0].item() == pytest.approx(80.0) and s[-1].item() == pytest.approx(0.002)
    i = torch.arange(6, dtype=torch.float64) / 5
    ref = (80 ** (1 / 7) + i * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(s, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(bb.sigmas(4, rho=1.0), torch.linspace(80, 0.002, 4, dtype=torch.float64))
    schedules = pytest.importorskip("epd.schedules")
    torch.testing.assert_close(s, schedules.edm_polynomial(6, 0.002, 80.0, 7.0))
    with pytest.raises(ConfigError):
        edm_sigmas(1, 0.002, 80.0)


def test_decode_range_and_shape(net):
    bb = _backbone(net, 1.0)
    img = bb.decode(torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 1, 5).expand(1, 1, 5, 5))
    assert img.shape == (1, 3, 5, 5)
    assert img[0, :, 0].tolist() == [[0.0, 0.0, 0.5, 1.0, 1.0]] * 3


def test_solver_runs_on_prompts(net):
    bb = _backbone(net, 2.0)
    cond = bb.prepare(["seven", "digit 1"])
    out = solve("euler", bb.denoiser, bb.noise([0, 1]), bb.sigmas(4), cond=cond)
    assert out.x.shape == (2, 1, 8, 8) and torch.isfinite(out.x).all()
    assert out.forward_passes == 3 * 2
