"""Our solvers against diffusers' schedulers on the same (analytic GMM) model, in float64.

The GMM is wrapped as an epsilon-prediction VP model and as a flow (velocity) model; both sides see the
same noise levels, the same initial state and the same model, so any difference is solver algebra.
"""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from epd.backbones.gmm import GMMDenoiser, make_gmm  # noqa: E402
from epd.solvers import solve  # noqa: E402



pytestmark = pytest.mark.usefixtures("float64_default")  # compare in float64 (tests/conftest.py)


GMM = make_gmm(dim=8, num_classes=2, per_class=2, seed=3)
DEN = GMMDenoiser(GMM, guidance=1.5)
COND = torch.arange(6) % 2
RTOL = 1e-6


def rel(a, b):
    return float((a - b).norm() / b.norm())


def edm_eps(x_vp, sigma):
    """epsilon prediction of the GMM for a VP state at EDM level sigma."""
    alpha = 1 / torch.sqrt(1 + sigma**2)
    x_edm = x_vp / alpha
    return (x_edm - DEN(x_edm, sigma.expand(x_vp.shape[0]), COND)) / sigma


def flow_velocity(x_t, t):
    """velocity of the GMM for a rectified-flow state at flow time t (EDM sigma = t / (1 - t)); at t = 1 the
    posterior mean is the (guided) data mean, taken at sigma = 1e9."""
    s = t / (1 - t) if t < 1 else torch.tensor(1e9)
    x_edm = x_t / (1 - t) if t < 1 else x_t * 1e9
    x0 = DEN(x_edm, s.expand(x_t.shape[0]), COND)
    return (x_t - x0) / t


class FlowEDM:
    """The flow model seen in EDM coordinates (what a flow adapter with coords='edm' provides)."""

    coords, passes_per_eval = "edm", 2

    def __call__(self, x, sigma, cond):
        return DEN(x, sigma, cond)


class FlowNative:
    """The flow model in native flow time: D(x_t, t) = x_t - t v."""

    coords, passes_per_eval = "flow", 2

    def __call__(self, x, t, cond):
        v = flow_velocity(x, t.reshape(-1)[0])
        return x - t.reshape(-1, 1) * v


def _x0(seed=0):
    return torch.randn(6, 8, generator=torch.Generator().manual_seed(seed))


def _vp_schedulers():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    return {
        "ddim": (DDIMScheduler(**common, set_alpha_to_one=True, steps_offset=1, clip_sample=False), "euler", {}),
        "dpmpp_2m": (DPMSolverMultistepScheduler(**common, solver_order=2, algorithm_type="dpmsolver++",
                                                 solver_type="midpoint"), "dpmpp_2m", {}),
        "dpmpp_3m": (DPMSolverMultistepScheduler(**common, solver_order=3, algorithm_type="dpmsolver++"),
                     "dpmpp_3m_diffusers", {}),
        "unipc": (UniPCMultistepScheduler(**common, solver_order=2, solver_type="bh2", predict_x0=True),
                  "unipc", {}),
    }


@pytest.mark.parametrize("steps", [8, 20])
@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "dpmpp_3m", "unipc"])
def test_vp_epsilon_parity(name, steps):
    sched, ours, opts = _vp_schedulers()[name]
    sched.set_timesteps(steps)
    if name == "ddim":
        ac = sched.alphas_cumprod.double()
        sched.alphas_cumprod = ac
        sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
        sig = [torch.sqrt((1 - ac[t]) / ac[t]) for t in sched.timesteps]
        grid = torch.stack(sig + [torch.tensor(0.0)])
    else:
        sched.sigmas = sched.sigmas.double()
        grid = sched.sigmas.clone()
    x_vp = _x0() / torch.sqrt(1 + grid[0] ** 2) * grid[0]  # VP state of EDM x = sigma_max * z
    x_edm = x_vp * torch.sqrt(1 + grid[0] ** 2)
    for i, t in enumerate(sched.timesteps):
        eps = edm_eps(x_vp, grid[i])
        x_vp = sched.step(eps, t, x_vp).prev_sample
    out = solve(ours, DEN, x_edm, grid, cond=COND, **opts)
    assert out.nfe == steps
    assert out.forward_passes == 2 * steps  # CFG doubling counted
    assert rel(out.x, x_vp) < RTOL  # final sigma is 0, where VP and EDM states coincide


def test_euler_discrete_parity():
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    sched.set_timesteps(12)
    sched.sigmas = sched.sigmas.double()
    grid = sched.sigmas.clone()
    x = _x0(1) * grid[0]
    x_ours = x.clone()
    for i, t in enumerate(sched.timesteps):
        x_in = sched.scale_model_input(x, t)
        eps = edm_eps(x_in, grid[i])
        x = sched.step(eps, t, x).prev_sample
    assert rel(solve("euler", DEN, x_ours, grid, cond=COND).x, x) < RTOL


@pytest.mark.parametrize("start", [1.0, 0.97])
def test_flowmatch_euler_parity_native_coords(start):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(sigmas=torch.linspace(start, 0.05, 10).tolist())
    sched.sigmas = sched.sigmas.double()
    grid = sched.sigmas.clone()  # shifted flow times, ending with 0
    z = _x0(2)
    x = z.clone()
    for i, t in enumerate(sched.timesteps):
        x = sched.step(flow_velocity(x, grid[i]), t, x).prev_sample
    assert rel(solve("euler", FlowNative(), z.clone(), grid, cond=COND).x, x) < RTOL
    if start < 1:
        # EDM coordinates: sigma = t / (1 - t), x_edm = x_t / (1 - t); the final grid point t = 0 maps to 0.
        sig = grid / (1 - grid)
        out = solve("euler", FlowEDM(), z / (1 - grid[0]), sig, cond=COND)
        assert rel(out.x, x) < RTOL


def test_dpmpp_flow_parity_edm_coords():
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(solver_order=2, algorithm_type="dpmsolver++", prediction_type="flow_prediction",
                                        use_flow_sigmas=True, flow_shift=3.0)
    sched.set_timesteps(10)
    sched.sigmas = sched.sigmas.double()
    t_grid = sched.sigmas.clone()
    assert t_grid[0] < 1 and t_grid[-1] == 0
    z = _x0(3)
    x = z * t_grid[0] + 0.0  # any state works: both sides start from the same x_t
    x_start = x.clone()
    for i, t in enumerate(sched.timesteps):
        x = sched.step(flow_velocity(x, t_grid[i]), t, x).prev_sample
    sig = t_grid / (1 - t_grid)
    out = solve("dpmpp_2m", FlowEDM(), x_start / (1 - t_grid[0]), sig, cond=COND)
    assert rel(out.x, x) < RTOL


def test_euler_is_ddim_is_flow_euler_first_order_identity():
    """One Euler step in EDM coordinates equals one flow-matching Euler step for any flow time pair."""
    z = _x0(4)
    t, t_next = torch.tensor(0.8), torch.tensor(0.3)
    x_t = z * 0.7
    v = flow_velocity(x_t, t)
    flow_next = x_t + (t_next - t) * v
    sig = torch.stack([t / (1 - t), t_next / (1 - t_next)])
    edm_next = solve("euler", FlowEDM(), x_t / (1 - t), sig, cond=COND).x * (1 - t_next)
    native_next = solve("euler", FlowNative(), x_t, torch.stack([t, t_next]), cond=COND).x
    assert rel(edm_next, flow_next) < 1e-10
    assert rel(native_next, flow_next) < 1e-10
