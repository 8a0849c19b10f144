"""Multistep baselines: DPM-Solver++ 2M/3M, UniPC (bh2, with corrector) and iPNDM (orders 1-4).

Exponential integrators are written in the data-prediction form with ``lambda = -log(sigma)``; in EDM
coordinates this is exactly the ``lambda = log(alpha / sigma)`` of Lu et al. and of diffusers'
``DPMSolverMultistepScheduler`` / ``UniPCMultistepScheduler`` (``algorithm_type="dpmsolver++"``,
``solver_type="midpoint"`` / ``"bh2"``, ``predict_x0=True``).
"""

from __future__ import annotations


import torch

from .common import SolverOutput, check_sigmas, new_counter, no_grad_unless_asked, sig, to_d


def _lam(s: torch.Tensor) -> torch.Tensor:
    return -torch.log(s)


def _dpmpp_order(i: int, n_steps: int, order: int, history: int, sigma_next, lower_order_final: bool) -> int:
    """Order used at step ``i`` (diffusers' warm-up and ``lower_order_final`` rules)."""
    last = i == n_steps - 1
    if last and (sigma_next == 0 or (lower_order_final and n_steps < 15)):
        return 1
    o = min(order, history)
    if order >= 3 and i == n_steps - 2 and lower_order_final and n_steps < 15:
        o = min(o, 2)
    return o


@no_grad_unless_asked
def sample_dpmpp_multistep(denoiser, x, sigmas, *, order: int = 2, cond=None, table=None, callback=None,
                           lower_order_final: bool = True, variant: str = "exact", return_trajectory=False,
                           context=""):
    """DPM-Solver++ multistep (Lu et al. 2022), order 2 ("2M", midpoint form) or 3 ("3M").

    The third-order update needs ``int_0^h e^{-(h-tau)} tau^2/2 dtau = h^2/2 - h + 1 - e^{-h}`` times ``D''``.
    With ``D2 = (D1_0 - D1_1) / (r0 + r1) ~ h^2 D'' / 2`` that is a coefficient ``-2 phi_3`` on ``D2``
    (``phi_3 = (e^{-h} - 1 + h) / h^2 - 1/2``); the reference implementation of DPM-Solver and diffusers'
    ``DPMSolverMultistepScheduler`` use ``-phi_3``, which leaves an ``O(h^3)`` local error, so that method is
    globally second order (measured by ``epd bench convergence``). ``variant="exact"`` (default) uses the
    third-order coefficient; ``variant="diffusers"`` reproduces diffusers bit for bit.

    Args:
        order (`int`): 2 or 3.
        lower_order_final (`bool`): use lower orders on the last steps when fewer than 15 steps are taken
            (stabilises few-step guided sampling; diffusers' default). A step to ``sigma = 0`` is always first order.
    """
    if order not in (2, 3):
        raise ValueError(f"order: DPM-Solver++ multistep supports 2 or 3, got {order}")
    if variant not in ("exact", "diffusers"):
        raise ValueError(f"variant: expected 'exact' or 'diffusers', got {variant!r}")
    c3 = 2.0 if variant == "exact" else 1.0
    sigmas = check_sigmas(sigmas)
    n = len(sigmas) - 1
    D = new_counter(denoiser, x, cond, context)
    traj = [x] if return_trajectory else []
    ms: list[torch.Tensor] = []
    for i in range(n):
        D.step = i
        s, t = sig(sigmas, i, x), sig(sigmas, i + 1, x)
        m0 = D(x, s, cond)
        ms.append(m0)
        o = _dpmpp_order(i, n, order, len(ms), t, lower_order_final)
        if t == 0:
            x = m0
        else:
            h = _lam(t) - _lam(s)
            phi = -torch.expm1(-h)  # 1 - e^{-h}
            if o == 1:
                x = (t / s) * x + phi * m0
            elif o == 2:
                r0 = (_lam(s) - _lam(sig(sigmas, i - 1, x))) / h
                d1 = (m0 - ms[-2]) / r0
                x = (t / s) * x + phi * (m0 + 0.5 * d1)
            else:
                s1, s2 = sig(sigmas, i - 1, x), sig(sigmas, i - 2, x)
                r0 = (_lam(s) - _lam(s1)) / h
                r1 = (_lam(s1) - _lam(s2)) / h
                d1_0 = (m0 - ms[-2]) / r0
                d1_1 = (ms[-2] - ms[-3]) / r1
                d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                em1 = torch.expm1(-h)  # e^{-h} - 1
                x = (t / s) * x - em1 * m0 + (em1 / h + 1) * d1 - c3 * ((em1 + h) / h**2 - 0.5) * d2
        ms = ms[-3:]
        if traj:
            traj.append(x)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "sigma_next": t, "denoised": m0})
    return SolverOutput(x, D.calls, D.forward_passes, D.calls, traj)


def sample_dpmpp_2m(denoiser, x, sigmas, **kw):
    """DPM-Solver++(2M)."""
    return sample_dpmpp_multistep(denoiser, x, sigmas, order=2, **kw)


def sample_dpmpp_3m(denoiser, x, sigmas, **kw):
    """DPM-Solver++(3M), third-order coefficients (see :func:`sample_dpmpp_multistep`)."""
    return sample_dpmpp_multistep(denoiser, x, sigmas, order=3, **kw)


def sample_dpmpp_3m_diffusers(denoiser, x, sigmas, **kw):
    """DPM-Solver++(3M) exactly as diffusers' ``DPMSolverMultistepScheduler(solver_order=3)`` computes it."""
    return sample_dpmpp_multistep(denoiser, x, sigmas, order=3, variant="diffusers", **kw)


def _unipc_coeffs(h: torch.Tensor, rks: list, order: int):
    """The ``R`` matrix, ``b`` vector, ``h_phi_1`` and ``B(h)`` of UniPC-bh2 in data-prediction form."""
    hh = -h
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    B_h = torch.expm1(hh)
    rk = torch.stack([torch.as_tensor(r, dtype=h.dtype, device=h.device) for r in rks])
    R, b = [], []
    fact = 1
    for j in range(1, order + 1):
        R.append(rk ** (j - 1))
        b.append(h_phi_k * fact / B_h)
        fact *= j + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    return torch.stack(R), torch.stack(b), h_phi_1, B_h


def _unipc_predict(x, s0, t, ms, lams, order):
    """UniP-bh2 predictor from ``s0`` to ``t`` using the last ``order`` data predictions in ``ms``."""
    m0 = ms[-1]
    h = -torch.log(t) - lams[-1]
    rks, d1s = [], []
    for k in range(1, order):
        rk = (lams[-1 - k] - lams[-1]) / h
        rks.append(rk)
        d1s.append((ms[-1 - k] - m0) / rk)
    rks.append(torch.ones_like(h))
    R, b, h_phi_1, B_h = _unipc_coeffs(h, rks, order)
    x_t = (t / s0) * x - h_phi_1 * m0
    if d1s:
        rhos = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
        x_t = x_t - B_h * sum(r * d for r, d in zip(rhos, d1s))
    return x_t


def _unipc_correct(x_prev, s0, t, m_t, ms, lams, order):
    """UniC-bh2 corrector: refine the state at ``t`` (predicted from ``x_prev`` at ``s0``) with ``m_t = D(x_t, t)``."""
    m0 = ms[-1]
    h = -torch.log(t) - lams[-1]
    rks, d1s = [], []
    for k in range(1, order):
        rk = (lams[-1 - k] - lams[-1]) / h
        rks.append(rk)
        d1s.append((ms[-1 - k] - m0) / rk)
    rks.append(torch.ones_like(h))
    R, b, h_phi_1, B_h = _unipc_coeffs(h, rks, order)
    rhos = [0.5] if order == 1 else torch.linalg.solve(R, b).tolist()
    x_t = (t / s0) * x_prev - h_phi_1 * m0
    corr = sum(r * d for r, d in zip(rhos[:-1], d1s)) if d1s else 0
    return x_t - B_h * (corr + rhos[-1] * (m_t - m0))


@no_grad_unless_asked
def sample_unipc(denoiser, x, sigmas, *, order: int = 2, cond=None, table=None, callback=None,
                 lower_order_final: bool = True, use_corrector: bool = True, return_trajectory=False,
                 context=""):
    """UniPC multistep (Zhao et al. 2023), bh2 variant, data prediction, with the UniC corrector.

    The corrector reuses the evaluation the next step needs anyway, so NFE equals the number of steps; the
    final state is not corrected. With ``order=2`` the predictor has order 2 and the corrected method order 3.
    """
    if order < 1 or order > 3:
        raise ValueError(f"order: UniPC supports orders 1-3, got {order}")
    sigmas = check_sigmas(sigmas)
    n = len(sigmas) - 1
    D = new_counter(denoiser, x, cond, context)
    traj = [x] if return_trajectory else []
    ms, lams = [], []
    x_prev, prev_order = None, None
    for i in range(n):
        D.step = i
        s, t = sig(sigmas, i, x), sig(sigmas, i + 1, x)
        m = D(x, s, cond)
        if use_corrector and x_prev is not None:
            x = _unipc_correct(x_prev, sig(sigmas, i - 1, x), s, m, ms, lams, prev_order)
        ms.append(m)
        lams.append(-torch.log(s))
        this_order = min(order, n - i) if lower_order_final else order
        this_order = min(this_order, i + 1)
        if t == 0:
            this_order = 1
        x_prev = x
        if t == 0:
            x = m
        else:
            x = _unipc_predict(x, s, t, ms, lams, this_order)
        prev_order = this_order
        ms, lams = ms[-order:], lams[-order:]
        if traj:
            traj.append(x)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "sigma_next": t, "denoised": m})
    return SolverOutput(x, D.calls, D.forward_passes, D.calls, traj)


# Adams-Bashforth coefficients on the slope history, newest first.
IPNDM_COEFFS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def ab_combine(ds: list[torch.Tensor], max_order: int) -> torch.Tensor:
    """Adams-Bashforth combination of the slope history ``ds`` (oldest first), order ``min(len(ds), max_order)``."""
    o = min(len(ds), max_order)
    coeffs = IPNDM_COEFFS[o]
    return sum(c * d for c, d in zip(coeffs, reversed(ds[-o:])))


def ab_variable_weights(sigmas_hist: list[float], sigma_next: float) -> list[float]:
    """Adams-Bashforth weights for unequal steps: integrate the polynomial through the slopes at
    ``sigmas_hist`` (oldest first, last = current) over ``[sigma_n, sigma_next]``; returned newest first."""
    s_n = sigmas_hist[-1]
    h = sigma_next - s_n
    rho = [(s - s_n) / h for s in reversed(sigmas_hist)]
    k = len(rho)
    A = torch.tensor([[r**m for r in rho] for m in range(k)], dtype=torch.float64)
    b = torch.tensor([1.0 / (m + 1) for m in range(k)], dtype=torch.float64)
    return torch.linalg.solve(A, b).tolist()


def _sample_adams_bashforth(denoiser, x, sigmas, max_order, variable_steps, cond, callback, return_trajectory,
                            context):
    """Adams-Bashforth on the slope history, order ramping 1..max_order; fixed equal-step coefficients
    (iPNDM) or weights integrated for the actual unequal steps (``ipndm_v``)."""
    if max_order not in IPNDM_COEFFS:
        raise ValueError(f"max_order: iPNDM supports 1-4, got {max_order}")
    sigmas = check_sigmas(sigmas)
    D = new_counter(denoiser, x, cond, context)
    traj = [x] if return_trajectory else []
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        D.step = i
        s, t = sig(sigmas, i, x), sig(sigmas, i + 1, x)
        denoised = D(x, s, cond)
        ds.append(to_d(x, s, denoised))
        if variable_steps:
            o = min(len(ds), max_order)
            w = ab_variable_weights([float(v) for v in sigmas[i + 1 - o: i + 1]], float(t))
            slope = sum(c * d for c, d in zip(w, reversed(ds[-o:])))
        else:
            slope = ab_combine(ds, max_order)
        x = x + (t - s) * slope
        ds = ds[-(max_order - 1):] if max_order > 1 else []
        if traj:
            traj.append(x)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "sigma_next": t, "denoised": denoised})
    return SolverOutput(x, D.calls, D.forward_passes, D.calls, traj)


@no_grad_unless_asked
def sample_ipndm_v(denoiser, x, sigmas, *, max_order: int = 4, cond=None, table=None, callback=None,
                   return_trajectory=False, context=""):
    """iPNDM with variable-step Adams-Bashforth weights (``ipndm_v``): keeps its order on unequal grids such as
    the EDM rho grid, where the fixed-coefficient :func:`sample_ipndm` is only second order."""
    return _sample_adams_bashforth(denoiser, x, sigmas, max_order, True, cond, callback, return_trajectory, context)


@no_grad_unless_asked
def sample_ipndm(denoiser, x, sigmas, *, max_order: int = 4, cond=None, table=None, callback=None,
                 return_trajectory=False, context=""):
    """Improved PNDM (Zhang & Chen 2023): Adams-Bashforth on the slope, order ramping 1..max_order."""
    return _sample_adams_bashforth(denoiser, x, sigmas, max_order, False, cond, callback, return_trajectory, context)

