"""CUDA-graph capture of denoiser calls and of whole solver steps, for fixed shapes.

A CUDA graph replays a recorded sequence of kernels with one launch, so a step costs what its kernels cost and
not what Python spends launching them. Three pieces:

* :class:`StaticGraph`: capture ``fn(*args)`` once (static input buffers, warm-up on a side stream, capture,
  replay); later calls copy their inputs into the static buffers and replay.
* :class:`CUDAGraphDenoiser`: a drop-in denoiser that keeps one graph per input shape; any solver in
  :mod:`epd.solvers` runs on it unchanged.
* :class:`GraphedEPDSampler` / :class:`GraphedEulerSampler`: a whole coarse step (probe call, the K points,
  the update) as one graph, with no host synchronisation inside the step loop. With a
  :class:`~epd.parallel.PointParallelDenoiser` the step is two graphs around the all-gather of the points.

Everything falls back to plain eager execution off CUDA (and under autograd), computing the same numbers, so
the CPU tests exercise the same step code.
"""

from __future__ import annotations

import gc
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .denoiser import Prepared, repeat_cond
from .errors import ConfigError
from .solvers.common import SolverOutput, check_final_finite, check_sigmas, to_d
from .solvers.epd import (ROW_KEYS, check_table_grid, epd_combine, epd_points, epd_step, probe_direction,
                          require_table, resolve_afs, stack_points, table_row, unstack_points)
from .solvers.nfe import paper_nfe

__all__ = ["StaticGraph", "CUDAGraphDenoiser", "GraphedEPDSampler", "GraphedEulerSampler", "graphs_usable"]


def graphs_usable(x: torch.Tensor) -> bool:
    """CUDA graphs apply: CUDA tensor, no autograd, not already inside a capture (then record eagerly)."""
    return (x.is_cuda and not torch.is_grad_enabled()
            and not torch.cuda.is_current_stream_capturing())


# ------------------------------------------------------------------------------------------- pytrees
def _flatten(obj: Any, leaves: list) -> Any:
    """Replace every tensor in ``obj`` by a leaf index; return the spec (hashable description)."""
    if isinstance(obj, torch.Tensor):
        leaves.append(obj)
        return ("T", len(leaves) - 1, tuple(obj.shape), obj.dtype, str(obj.device))
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return ("C", obj)
    if isinstance(obj, Prepared):
        return ("P", _flatten(obj.tensors, leaves), _flatten(obj.extra, leaves))
    if isinstance(obj, dict):
        return ("D", tuple((k, _flatten(v, leaves)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)):
        return ("L" if isinstance(obj, list) else "U", tuple(_flatten(v, leaves) for v in obj))
    raise ConfigError(f"cond: a CUDA-graphed call cannot take an argument of type {type(obj).__name__}; "
                      f"use tensors, Prepared, dicts, lists or plain constants")


def _unflatten(spec: Any, leaves: list) -> Any:
    tag = spec[0]
    if tag == "T":
        return leaves[spec[1]]
    if tag == "C":
        return spec[1]
    if tag == "P":
        return Prepared(_unflatten(spec[1], leaves), _unflatten(spec[2], leaves))
    if tag == "D":
        return {k: _unflatten(v, leaves) for k, v in spec[1]}
    vals = [_unflatten(v, leaves) for v in spec[1]]
    return vals if tag == "L" else tuple(vals)


class StaticGraph:
    """``fn(*args)`` captured as a CUDA graph for the shapes of ``example_args``.

    Args:
        fn (`Callable`): a function of tensors (nested in Prepared/dicts/lists); it must not synchronise with
            the host (no ``.item()``, no data-dependent Python branches).
        example_args (`tuple`): arguments with the shapes, dtypes and devices of every later call.
        warmup (`int`): eager runs on a side stream before capture (kernel selection, lazy initialisation).
        pool: a memory pool handle (``torch.cuda.graph_pool_handle()``) to share between graphs that are never
            replayed concurrently.
        keep (`tuple` of `int`): indices of arguments whose tensors are treated as constants between calls: they
            are copied only when a different tensor (or a modified one) is passed. Used for conditioning.
        alias (`tuple` of `int`): indices of arguments whose tensors become the static buffers themselves (no
            copy; the caller keeps them alive and writes new inputs into them in place).

    Calling returns the static outputs (the same tensors each time; they are overwritten by the next replay).
    """

    def __init__(self, fn: Callable, example_args: tuple, *, warmup: int = 2, pool=None, keep: tuple = (),
                 alias: tuple = ()):
        self.fn = fn
        leaves: list = []
        self.spec = _flatten(tuple(example_args), leaves)
        self.keep_leaves = self._leaves_of(example_args, keep)
        aliased = self._leaves_of(example_args, alias)
        self.static = [t if i in aliased else t.detach().clone() for i, t in enumerate(leaves)]
        self._last: list = [None] * len(self.static)
        args = _unflatten(self.spec, self.static)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(max(1, warmup)):
                fn(*args)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # Destroying another CUDA graph during this capture (a garbage-collection pass freeing an old sampler)
        # invalidates it ("operation not permitted when stream is capturing"): collect first, then keep the
        # collector off while capturing. Thread-local mode: a CUDA call from another thread (the NCCL watchdog
        # polling a finished collective) must not invalidate the capture either.
        gc.collect()
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            with torch.no_grad(), torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
                self.out = fn(*args)
        finally:
            if was_enabled:
                gc.enable()

    @staticmethod
    def _leaves_of(args: tuple, which: tuple) -> set:
        """Leaf indices (in :func:`_flatten` order) that belong to the arguments numbered ``which``."""
        idx: set = set()
        leaves: list = []
        for i, a in enumerate(args):
            n0 = len(leaves)
            _flatten(a, leaves)
            if i in which:
                idx.update(range(n0, len(leaves)))
        return idx

    def load(self, *args) -> None:
        """Copy ``args`` into the static buffers (skipping unchanged constant arguments)."""
        leaves: list = []
        spec = _flatten(tuple(args), leaves)
        if spec != self.spec:
            raise ConfigError("graph call: argument shapes/dtypes differ from the captured ones")
        for i, (dst, src) in enumerate(zip(self.static, leaves)):
            if i in self.keep_leaves:
                last = self._last[i]
                if last is not None and last[0] is src and last[1] == src._version:
                    continue
                self._last[i] = (src, src._version)
            if src.data_ptr() != dst.data_ptr():
                dst.copy_(src)

    def __call__(self, *args):
        self.load(*args)
        self.graph.replay()
        return self.out


# ------------------------------------------------------------------------------------------- denoiser
class CUDAGraphDenoiser:
    """A denoiser whose calls replay CUDA graphs, one per input shape.

    Args:
        inner: the :class:`~epd.denoiser.Denoiser` (it must not synchronise with the host).
        warmup (`int`): eager warm-up runs before each capture.
        clone_output (`bool`): return a copy of the static output (safe to keep across calls); ``False`` returns
            the static buffer itself, valid until the next call with the same shape.
        enabled (`bool`, *optional*): force graphs off (``False``); default on for CUDA inputs without autograd.

    Conditioning is treated as constant between calls (prepared once per prompt batch): it is re-copied only when
    another tensor, or a modified one, is passed.
    """

    defer_finite_check = True  # a per-call isfinite() would synchronise; solve() checks the final state instead

    def __init__(self, inner: Callable, *, warmup: int = 2, clone_output: bool = True, enabled: bool | None = None,
                 pool=None):
        self.inner = inner
        self.warmup = warmup
        self.clone_output = clone_output
        self.enabled = True if enabled is None else bool(enabled)
        self.pool = pool
        self.coords = getattr(inner, "coords", "edm")
        self.passes_per_eval = int(getattr(inner, "passes_per_eval", 1))
        self.graphs: dict = {}
        self.replays = 0
        self.capture_error: str | None = None

    def __getattr__(self, name):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _call(self, x, sigma, cond):
        return self.inner(x, sigma, cond)

    def __call__(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        if not (self.enabled and graphs_usable(x)):
            return self.inner(x, sigma, cond)
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if sigma.dim() == 0:
            sigma = sigma.expand(x.shape[0])
        leaves: list = []
        key = (tuple(x.shape), x.dtype, str(x.device), sigma.dtype, _flatten(cond, leaves))
        g = self.graphs.get(key)
        if g is None:
            try:
                g = self.graphs[key] = StaticGraph(self._call, (x, sigma, cond), warmup=self.warmup, pool=self.pool,
                                                   keep=(2,))
            except RuntimeError as e:  # a call that cannot be captured still runs, eagerly
                self.capture_error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                warnings.warn(f"CUDA-graph capture failed, running eagerly: {self.capture_error}", stacklevel=2)
                self.enabled = False
                return self.inner(x, sigma, cond)
        out = g(x, sigma, cond)
        self.replays += 1
        return out.clone() if self.clone_output else out


# ------------------------------------------------------------------------------------------- samplers
@dataclass
class _Plan:
    """Shape of a run: images ``B``, points ``K``, coarse steps, analytic first step."""

    B: int
    K: int
    n_steps: int
    afs: bool


class _GraphedSampler:
    """Shared machinery: per-step parameters packed in one device tensor, a static state, graphs per step kind."""

    def __init__(self, denoiser, *, warmup: int = 1, enabled: bool | None = None, check_finite: bool = True):
        from .parallel import PointParallelDenoiser

        self.ppd = denoiser if isinstance(denoiser, PointParallelDenoiser) else None
        self.denoiser = denoiser
        self.base = self.ppd.inner if self.ppd is not None else denoiser
        self.warmup = warmup
        self.enabled = True if enabled is None else bool(enabled)
        self.check_finite = check_finite
        self.coords = getattr(denoiser, "coords", "edm")
        self.passes_per_eval = int(getattr(denoiser, "passes_per_eval", 1))
        self.graphs: dict = {}
        self.capture_error: str | None = None
        self._state: dict | None = None
        self._plan: _Plan | None = None

    def _graphed(self) -> bool:
        return self.enabled and graphs_usable(self._state["x"])

    def prepare(self, x: torch.Tensor, sigmas: torch.Tensor, cond=None) -> None:
        """Load the initial state, the grid and the conditioning; later :meth:`step` calls advance the state."""
        raise NotImplementedError

    def load_state(self, x: torch.Tensor) -> None:
        """Replace the current state (same shape) in place, e.g. to time one step repeatedly."""
        self._state["x"].copy_(x)

    def _run_segment(self, key, fn, args, alias=(0, 1)):
        """``fn(*args)``, replayed as a graph when on CUDA. ``args[0]``/``args[1]`` are the sampler's own static
        buffers (state, step parameters), used by the graph in place; ``args[2]`` is the conditioning."""
        if not self._graphed():
            return fn(*args)
        g = self.graphs.get(key)
        if g is None:
            try:
                g = self.graphs[key] = StaticGraph(fn, args, warmup=self.warmup, keep=(2,), alias=alias)
            except RuntimeError as e:  # a step that cannot be captured still runs, eagerly
                self.capture_error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                warnings.warn(f"CUDA-graph capture failed, running eagerly: {self.capture_error}", stacklevel=2)
                self.enabled = False
                return fn(*args)
        return g(*args)

    def _load_params(self, n: int) -> torch.Tensor:
        p = self._state["p"]
        if self._graphed():
            p.copy_(self._params[n])
            return p
        return self._params[n]

    def _commit(self, x_new: torch.Tensor) -> torch.Tensor:
        st = self._state
        if self._graphed():
            st["x"].copy_(x_new)
        else:
            st["x"] = x_new
        return st["x"]

    def result(self) -> torch.Tensor:
        """The current state; raises :class:`~epd.errors.NonFiniteError` on NaN/inf (one host sync)."""
        x = self._state["x"]
        if self.check_finite:
            check_final_finite(x)
        return x

    def run(self, x: torch.Tensor, sigmas: torch.Tensor, cond=None) -> SolverOutput:
        """Sample from ``x`` over ``sigmas``; returns :class:`~epd.solvers.common.SolverOutput`."""
        self.prepare(x, sigmas, cond)
        for n in range(self._plan.n_steps):
            self.step(n)
        return self._output(self.result().clone())

    def step(self, n: int) -> torch.Tensor:
        raise NotImplementedError


class GraphedEPDSampler(_GraphedSampler):
    """EPD sampling (:func:`epd.solvers.epd.sample_epd`, parallel points, no plugin) with graphed steps.

    The step is the one of ``sample_epd``: the same functions of :mod:`epd.solvers.epd`, so on the CPU (eager
    fallback) the result is bitwise the same, and on CUDA the same up to kernel choice. Each step is one graph
    replay (two around the all-gather with a :class:`~epd.parallel.PointParallelDenoiser`), preceded by two
    device-to-device copies (the step's packed parameters and the new state). NaN/inf is checked once at the
    end, not per call.

    Args:
        denoiser: a denoiser, or a :class:`~epd.parallel.PointParallelDenoiser` around one.
        table: the EPD parameter table (``row(n, dtype, device)``, ``num_steps``).
        afs (`bool`, *optional*): analytic first step; default the table's ``afs`` metadata.
        warmup (`int`): eager runs before each capture.
        enabled (`bool`, *optional*): ``False`` forces eager execution.
        check_finite (`bool`): check the final state for NaN/inf.
    """

    def __init__(self, denoiser, table, *, afs: bool | None = None, warmup: int = 1, enabled: bool | None = None,
                 check_finite: bool = True):
        super().__init__(denoiser, warmup=warmup, enabled=enabled, check_finite=check_finite)
        require_table(table)
        self.table = table
        self.afs = resolve_afs(table, afs)

    def prepare(self, x, sigmas, cond=None):
        sigmas = check_sigmas(torch.as_tensor(sigmas), allow_final_zero=False)
        check_table_grid(self.table, sigmas)
        B, n_steps = x.shape[0], len(sigmas) - 1
        sig = sigmas.to(dtype=x.dtype, device=x.device)
        rows = [table_row(self.table, n, x, B) for n in range(n_steps)]
        K = rows[-1]["positions"].shape[1]
        self._plan = _Plan(B, K, n_steps, self.afs)
        if self.ppd is not None:
            self.ppd.plan(K * B, B)  # K not divisible by the ranks: fail here, before any work
        # one packed row per step: (sigma_n, sigma_{n+1}, then each (B, K) table entry flattened): (n_steps, 2 + 4 B K)
        self._params = torch.stack([torch.cat([sig[n:n + 2]] + [row[k].reshape(-1) for k in ROW_KEYS])
                                    for n, row in enumerate(rows)])
        self._state = {"x": x.detach().clone(), "p": self._params[0].clone(), "cond": cond}

    def _split(self, p):
        """Unpack a step's parameters: ``(sigma_n, sigma_{n+1}, row of (B, K) tensors)``."""
        B, K = self._plan.B, self._plan.K
        r = p[2:].reshape(len(ROW_KEYS), B, K)
        return p[0], p[1], dict(zip(ROW_KEYS, r))

    def _D(self, x, s, cond):
        """The probe call: one noise level for the whole batch."""
        return self.base(x, s.expand(x.shape[0]), cond)

    def _whole(self, x, p, cond, first: bool):
        s, t, row = self._split(p)
        d = probe_direction(self._D, x, s, cond, analytic=first)
        return epd_step(self.base, x, d, s, t, row, repeat_cond(cond, self._plan.K))[0]

    def _part_a(self, x, p, cond, first: bool):
        """Probe and points; this rank's share of the K-point call (the gather follows outside the graph)."""
        s, t, row = self._split(p)
        d = probe_direction(self._D, x, s, cond, analytic=first)
        s_k, y = epd_points(x, d, s, t, row)
        y_flat, s_in = stack_points(y, row["scale_time"] * s_k)
        part, plan = self.ppd.local(y_flat, s_in, repeat_cond(cond, self._plan.K), batch=self._plan.B)
        return y, s_k, (part if part is not None else y_flat.new_zeros(0))

    def _part_c(self, x, p, y, s_k, den):
        """The weighted combination, from the gathered K-point output."""
        s, t, row = self._split(p)
        return epd_combine(x, s, t, y, s_k, unstack_points(den, self._plan.B, self._plan.K), row)

    def step(self, n: int) -> torch.Tensor:
        """Advance the loaded state by coarse step ``n``; returns the (static) new state."""
        st = self._state
        first = self.afs and n == 0
        p = self._load_params(n)
        B, K = self._plan.B, self._plan.K
        plan = self.ppd.plan(K * B, B) if self.ppd is not None else None
        if plan is None:
            x_new = self._run_segment(("whole", first), lambda a, b, c: self._whole(a, b, c, first),
                                      (st["x"], p, st["cond"]))
        else:
            y, s_k, part = self._run_segment(("a", first), lambda a, b, c: self._part_a(a, b, c, first),
                                             (st["x"], p, st["cond"]))
            den = self.ppd.gather(part if part.numel() else None, plan, st["x"])
            x_new = self._run_segment(("c",), lambda a, b, c, d, e, f: self._part_c(a, b, d, e, f),
                                      (st["x"], p, None, y, s_k, den), alias=(0, 1, 3, 4))
        return self._commit(x_new)

    def _output(self, x):
        P = self._plan
        probes = P.n_steps - int(P.afs)
        points = probes + P.K * P.n_steps
        return SolverOutput(x, probes + P.n_steps, points * self.passes_per_eval,
                            paper_nfe("epd", P.n_steps + 1, P.afs), [])


class GraphedEulerSampler(_GraphedSampler):
    """Euler (= DDIM = flow-matching Euler, :func:`epd.solvers.single_step.sample_euler`) with each step one graph
    replay: the single-evaluation baseline on the same fast path as :class:`GraphedEPDSampler`."""

    def prepare(self, x, sigmas, cond=None):
        sigmas = check_sigmas(torch.as_tensor(sigmas))
        n_steps = len(sigmas) - 1
        sig = sigmas.to(dtype=x.dtype, device=x.device)
        self._plan = _Plan(x.shape[0], 1, n_steps, False)
        self._params = torch.stack([sig[n:n + 2] for n in range(n_steps)])
        self._state = {"x": x.detach().clone(), "p": self._params[0].clone(), "cond": cond}

    def _euler(self, x, p, cond):
        s, t = p[0], p[1]
        denoised = self.base(x, s.expand(x.shape[0]), cond)
        return x + (t - s) * to_d(x, s, denoised)

    def step(self, n: int) -> torch.Tensor:
        st = self._state
        p = self._load_params(n)
        return self._commit(self._run_segment(("euler",), self._euler, (st["x"], p, st["cond"])))

    def _output(self, x):
        P = self._plan
        return SolverOutput(x, P.n_steps, P.n_steps * self.passes_per_eval, P.n_steps, [])
