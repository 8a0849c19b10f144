"""The paper's NFE count (spec §3.3), written once.

On a grid of ``N`` points ending above 0 (``N - 1`` steps) a solver spends ``evals_per_step`` sequential
evaluations per step, less those the analytic first step saves::

    paper NFE = evals_per_step * (N - 1) - saved       # EPD: 2 (N - 1) - [afs]

EPD counts its K parallel points as one evaluation (they run in one batched call), so EPD and EPD-Plugin spend
two per step: the probe and the K points; the analytic first step (AFS) replaces the first probe. AMED-Solver and
AMED-Plugin are EPD with one point (K = 1) and count the same way. Heun and
DPM-Solver-2 spend two, every other baseline one. The solvers, the graphed samplers and the registry all read
the count here.
"""

from __future__ import annotations

from ..errors import ConfigError

__all__ = ["TABLE_SOLVERS", "TABLE_POINTS", "paper_nfe", "steps_for_nfe"]

TABLE_SOLVERS = {"epd", "epd_ipndm", "amed", "amed_plugin"}  # solvers that take an EPD parameter table
# points per step a table solver's table must have (absent: any K); AMED is EPD with one point
TABLE_POINTS = {"amed": 1, "amed_plugin": 1}
TWO_EVAL_SOLVERS = ("heun", "dpm2")  # baselines with a second (corrector / midpoint) evaluation per step


def _evals_per_step(solver: str) -> int:
    return 2 if solver in TWO_EVAL_SOLVERS or solver in TABLE_SOLVERS else 1


def _saved(solver: str, afs) -> int:
    """Evaluations the analytic first step saves (one, for table solvers run with AFS)."""
    return int(bool(afs)) if solver in TABLE_SOLVERS else 0


def paper_nfe(solver: str, N: int, afs=False) -> int:
    """NFE as the paper counts it for ``solver`` on a grid of ``N`` points ending above 0.

    Args:
        solver (`str`): a registered solver name (:data:`epd.solvers.SOLVERS`).
        N (`int`): grid points (``N - 1`` steps).
        afs: analytic first step (read only by table solvers; a table's ``afs`` metadata may be None).
    """
    return _evals_per_step(solver) * (N - 1) - _saved(solver, afs)


def steps_for_nfe(solver: str, nfe: int, afs: bool = True) -> int:
    """Grid points ``N`` at which ``solver`` spends paper-NFE ``nfe`` (the inverse of :func:`paper_nfe`).

    Raises:
        ConfigError: no grid gives that NFE (odd NFE for Heun/DPM-2; the wrong parity for EPD with/without AFS).
    """
    per_step, saved = _evals_per_step(solver), _saved(solver, afs)
    if (nfe + saved) % per_step:
        if solver in TABLE_SOLVERS:
            raise ConfigError(f"nfe: EPD with afs={afs} reaches only {'odd' if afs else 'even'} NFE; got {nfe}")
        raise ConfigError(f"nfe: {solver} spends 2 evaluations per step; NFE {nfe} is odd")
    return (nfe + saved) // per_step + 1
