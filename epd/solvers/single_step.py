"""Single-step baselines: Euler (= DDIM), Heun (EDM Algorithm 1/2 without churn), DPM-Solver-2.

All are written for ``dx/dsigma = (x - D(x, sigma)) / sigma`` (see :mod:`epd.denoiser`).
"""

from __future__ import annotations

import torch

from .common import SolverOutput, check_sigmas, new_counter, sig, to_d


def _finish(x, counter, traj):
    return SolverOutput(x, counter.calls, counter.forward_passes, counter.calls, traj)


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, *, cond=None, table=None, callback=None, return_trajectory=False,
                 context=""):
    """Euler steps on the noise-level grid; identical to deterministic DDIM and to flow-matching Euler."""
    sigmas = check_sigmas(sigmas)
    D = new_counter(denoiser, x, cond, context)
    traj = [x] if return_trajectory else []
    for i in range(len(sigmas) - 1):
        D.step = i
        s, s_next = sig(sigmas, i, x), sig(sigmas, i + 1, x)
        denoised = D(x, s, cond)
        d = to_d(x, s, denoised)
        x = x + (s_next - s) * d
        _emit(callback, i, x, s, s_next, denoised, traj)
    return _finish(x, D, traj)


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, cond=None, table=None, callback=None, return_trajectory=False,
                context=""):
    """Heun's second-order method (Karras et al. 2022, Algorithm 1); an Euler step when ``sigma_next == 0``."""
    sigmas = check_sigmas(sigmas)
    D = new_counter(denoiser, x, cond, context)
    traj = [x] if return_trajectory else []
    for i in range(len(sigmas) - 1):
        D.step = i
        s, s_next = sig(sigmas, i, x), sig(sigmas, i + 1, x)
        denoised = D(x, s, cond)
        d = to_d(x, s, denoised)
        x_euler = x + (s_next - s) * d
        if s_next == 0:
            x = x_euler
        else:
            d_prime = to_d(x_euler, s_next, D(x_euler, s_next, cond))
            x = x + (s_next - s) * (d + d_prime) / 2
        _emit(callback, i, x, s, s_next, denoised, traj)
    return _finish(x, D, traj)


@torch.no_grad()
def sample_dpm2(denoiser, x, sigmas, *, cond=None, table=None, callback=None, return_trajectory=False,
                context=""):
    """DPM-Solver-2 (midpoint in log-sigma): probe at ``sqrt(sigma * sigma_next)``, step with the midpoint slope.

    An Euler step when ``sigma_next == 0``.
    """
    sigmas = check_sigmas(sigmas)
    D = new_counter(denoiser, x, cond, context)
    traj = [x] if return_trajectory else []
    for i in range(len(sigmas) - 1):
        D.step = i
        s, s_next = sig(sigmas, i, x), sig(sigmas, i + 1, x)
        denoised = D(x, s, cond)
        d = to_d(x, s, denoised)
        if s_next == 0:
            x = x + (s_next - s) * d
        else:
            s_mid = (s * s_next).sqrt()
            x_mid = x + (s_mid - s) * d
            d_mid = to_d(x_mid, s_mid, D(x_mid, s_mid, cond))
            x = x + (s_next - s) * d_mid
        _emit(callback, i, x, s, s_next, denoised, traj)
    return _finish(x, D, traj)


def _emit(callback, i, x, s, s_next, denoised, traj):
    if traj is not None and len(traj) > 0:
        traj.append(x)
    if callback is not None:
        callback({"i": i, "x": x, "sigma": s, "sigma_next": s_next, "denoised": denoised})
