"""Flow-matching grids: the spec §2 vectors and diffusers' own schedulers."""

import math

import numpy as np
import pytest
import torch

from epd.flow_schedules import (calculate_flux_mu, dpm_flow_sigmas, dynamic_shift, edm_to_flow,
                                          flow_to_edm, flux_sigmas, sd3_sigmas)
from epd.errors import ConfigError

# spec §2 (derived there with diffusers 0.36.0)
SD3_N11 = [1.0, 0.964400, 0.923342, 0.875468, 0.818923, 0.751121, 0.668327, 0.564950, 0.432225, 0.255589, 0.008929]
FLUX_N9 = [1.0, 0.956771, 0.904646, 0.840563, 0.759876, 0.655169, 0.513842, 0.312612, 0.003151]


def test_original_grids_match_spec_vectors():
    assert torch.allclose(sd3_sigmas(11), torch.tensor(SD3_N11, dtype=torch.float64), atol=1e-5, rtol=0)
    assert torch.allclose(flux_sigmas(9, 1.15), torch.tensor(FLUX_N9, dtype=torch.float64), atol=1e-5, rtol=0)
    # The metadata's sigma_min is the scheduler's once-shifted 1/1000; the grid shifts again (ends at 0.008929).
    assert sd3_sigmas(2)[-1] == pytest.approx(3 * (3e-3 / 1.002) / (1 + 2 * (3e-3 / 1.002)), rel=1e-12)


def test_flux_official_grid_differs_from_original():
    # FluxPipeline with 9 steps (spec §2: [1.0, 0.96193, ..., 0.28304, 0])
    off = flux_sigmas(10, 1.15, "flowmatch_official")
    assert len(off) == 10 and off[-1] == 0
    assert off[1].item() == pytest.approx(0.96193, abs=1e-5)
    assert off[-2].item() == pytest.approx(0.28304, abs=1e-5)
    # Same number of points (the original's N = 9): the original stops above 0, the pipeline steps to 0, and the
    # interior points differ too.
    orig9, off9 = flux_sigmas(9, 1.15, "flowmatch"), flux_sigmas(9, 1.15, "flowmatch_official")
    assert orig9[-1].item() == pytest.approx(0.003151, abs=1e-6) and off9[-1] == 0
    assert (orig9[:-1] - off9[:-1]).abs().max() > 1e-3


def test_flux_mu_from_token_count():
    assert calculate_flux_mu(4096) == pytest.approx(1.15)  # 1024x1024: (128/2)^2 packed tokens
    assert calculate_flux_mu(256) == pytest.approx(0.5)
    assert calculate_flux_mu(1024) == pytest.approx(0.5 + 768 * 0.65 / 3840)


@pytest.mark.parametrize("n", [2, 3, 9, 11, 21])
def test_grids_equal_diffusers_schedulers(n):
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    sd3 = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sd3.set_timesteps(n)  # the original: N points, terminal 0 dropped
    assert torch.allclose(sd3.sigmas[:-1].double(), sd3_sigmas(n), atol=1e-6, rtol=0)
    sd3.set_timesteps(n - 1)  # the pipeline for N - 1 steps
    assert torch.allclose(sd3.sigmas.double(), sd3_sigmas(n, schedule="flowmatch_official"), atol=1e-6, rtol=0)

    flux = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    for mu in (0.5, 0.8, 1.15):
        flux.set_timesteps(n, mu=mu)
        assert torch.allclose(flux.sigmas[:-1].double(), flux_sigmas(n, mu), atol=1e-6, rtol=0)
        flux.set_timesteps(sigmas=np.linspace(1.0, 1 / (n - 1), n - 1), mu=mu)  # FluxPipeline's sigmas
        assert torch.allclose(flux.sigmas.double(), flux_sigmas(n, mu, "flowmatch_official"), atol=1e-6, rtol=0)

    dpm = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    dpm.set_timesteps(n - 1)
    assert torch.allclose(dpm.sigmas.double(), dpm_flow_sigmas(n, 3.0), atol=1e-6, rtol=0)
    assert torch.allclose(dpm.sigmas.double(), sd3_sigmas(n, schedule="flowmatch_dpm"), atol=1e-6, rtol=0)
    dyn = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                      use_dynamic_shifting=True)
    dyn.set_timesteps(n - 1, mu=1.15)
    assert torch.allclose(dyn.sigmas.double(), flux_sigmas(n, 1.15, "flowmatch_dpm"), atol=1e-6, rtol=0)


def test_dynamic_shift_is_static_shift_with_exp_mu():
    s = torch.linspace(0, 1, 17, dtype=torch.float64)
    em = math.exp(0.93)
    assert torch.allclose(dynamic_shift(s, 0.93), em * s / (1 + (em - 1) * s), atol=1e-15)
    assert dynamic_shift(torch.tensor([0.0]), 1.15).item() == 0.0


def test_edm_conversion_round_trip_and_pure_noise():
    t = sd3_sigmas(11)[1:]
    sigma = flow_to_edm(t)
    assert torch.allclose(edm_to_flow(sigma), t, atol=1e-15)
    # DPM-Solver's lambda = log((1 - t) / t) is -log(sigma_edm).
    assert torch.allclose(torch.log((1 - t) / t), -torch.log(sigma), atol=1e-12)
    with pytest.raises(ConfigError, match="t = 1"):
        flow_to_edm(sd3_sigmas(11))


def test_bad_arguments():
    with pytest.raises(ConfigError, match="num_points"):
        sd3_sigmas(1)
    with pytest.raises(ConfigError, match="num_points"):
        flux_sigmas(1, 1.15, "flowmatch_official")
    assert flux_sigmas(2, 1.15, "flowmatch_official").tolist() == [1.0, 0.0]  # one official step
    with pytest.raises(ConfigError, match="unknown flow schedule"):
        sd3_sigmas(11, schedule="karras")
    with pytest.raises(ConfigError, match="unknown flow schedule"):
        flux_sigmas(11, 1.15, schedule="karras")
