"""Residual Dirichlet policy over EPD tables (RDPO, spec §6.2-6.4).

One *action* is a complete EPD table for one image: for every coarse step ``n``

* segments ``seg_n ~ Dir(alpha_pos[n])`` (``K + 1`` values), positions ``cumsum(seg_n)[:K]`` (strictly increasing);
* weights ``w_n ~ Dir(alpha_w[n])``;
* optionally direction / time scales ``c_{n,k}, a_{n,k} ~ LogNormal(mu, sigma)`` independently.

The concentrations are ``exp(base + residual)``: the frozen ``base_log_*`` buffers come from a cold-start table
(``alpha = c * segments``, ``c * weights``) and the residual is produced by a small MLP over a learned step
embedding whose output layer starts at zero, so the untrained policy's mean is the start table.

Parameter and buffer names equal the original ``EPDParamPolicy`` (spec §5.5), so its ``policy-step*.pt``
checkpoints load with ``load_state_dict(strict=True)`` (see :meth:`EPDParamPolicy.from_state_dict`).

Typical use (the trainer)::

    policy = EPDParamPolicy.from_table(table, concentration=20.0)
    action = policy.sample(batch=8, generator=g)            # detached sample, one table per image
    out = solve("epd", denoiser, x, sigmas, cond=cond, table=action.tables(table.meta))
    old_logp = policy.log_prob(action).detach()
    ...                                                    # PPO: ratio = exp(policy.log_prob(action) - old_logp)
    snapshot = policy.mean_table(meta=table.meta)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Dirichlet, LogNormal, Normal, kl_divergence

from ..errors import ConfigError, EPDError
from ..table import EPDTable

__all__ = [
    "EPDParamPolicy", "PolicyAction", "SampledTables", "StepDistributions", "ColdStart", "SanitizedRows",
    "sanitize_rows", "cold_start", "SANITIZE_EPS", "MIN_ALPHA", "LOG_STD_RANGE",
]

SANITIZE_EPS = 1e-6  # minimum position gap / distance to 0 and 1 (cold start and export)
DEGENERATE = 1e-6  # cold start: rows with a segment or weight <= this fall back to uniform
MIN_ALPHA = 1e-5  # concentrations are clamped below at this value
LOG_STD_RANGE = (-7.0, 2.0)  # clamp of the log-normal heads' log standard deviation
MIN_SAMPLE = 1e-6  # sampled segments/weights are floored at this and renormalised (positions stay strictly increasing)
_SCALES = ("dir", "time")


# ---------------------------------------------------------------------- cold start
@dataclass
class SanitizedRows:
    """Result of :func:`sanitize_rows`: sorted and separated tables plus the affected row indices."""

    positions: torch.Tensor
    weights: torch.Tensor
    scale_dir: torch.Tensor | None
    scale_time: torch.Tensor | None
    reordered: list[int]
    adjusted: list[int]


def sanitize_rows(positions, weights, scale_dir=None, scale_time=None, eps: float = SANITIZE_EPS) -> SanitizedRows:
    """Sort each row by position (weights/scales permuted alongside), then clip sequentially so that
    ``r_1 >= eps``, ``r_{k+1} >= r_k + eps`` and ``r_k <= 1 - eps (K - k + 1)`` (spec §6.2).

    Args:
        positions, weights (`torch.Tensor` of shape `(N-1, K)`): the table (any float dtype; computed in float64).
        scale_dir, scale_time (`torch.Tensor`, *optional*): scales, permuted with the positions.
        eps (`float`): minimum gap.

    Returns:
        :class:`SanitizedRows` (float64 tensors; ``reordered``/``adjusted`` list row indices).
    """
    p = torch.as_tensor(positions, dtype=torch.float64)
    order = torch.argsort(p, dim=1, stable=True)
    reordered = (order != torch.arange(p.shape[1])).any(1).nonzero().flatten().tolist()
    g = lambda t: None if t is None else torch.gather(torch.as_tensor(t, dtype=torch.float64), 1, order)  # noqa: E731
    p, w, sd, st = g(p), g(weights), g(scale_dir), g(scale_time)
    K = p.shape[1]
    out = p.clone()
    for k in range(K):
        lo = eps if k == 0 else out[:, k - 1] + eps
        out[:, k] = torch.clamp(torch.maximum(out[:, k], torch.as_tensor(lo, dtype=torch.float64)),
                                max=1 - eps * (K - k))
    adjusted = (out != p).any(1).nonzero().flatten().tolist()
    if not ((out > 0) & (out < 1)).all() or (K > 1 and not (torch.diff(out, dim=1) > 0).all()):
        raise ConfigError("sanitize_rows: positions could not be made strictly increasing in (0, 1) "
                          f"(K={K} is too large for eps={eps})")
    return SanitizedRows(out, w, sd, st, reordered, adjusted)


@dataclass
class ColdStart:
    """Frozen base parameters of a policy (log-concentrations and log-normal heads), all float32 ``(N-1, .)``."""

    base_log_alpha_pos: torch.Tensor
    base_log_alpha_weight: torch.Tensor
    base_log_scale_dir: torch.Tensor | None = None
    base_log_std_dir: torch.Tensor | None = None
    base_log_scale_time: torch.Tensor | None = None
    base_log_std_time: torch.Tensor | None = None
    reordered_rows: tuple = ()
    adjusted_rows: tuple = ()
    fallback_rows: tuple = ()

    def buffers(self) -> dict[str, torch.Tensor | None]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name.startswith("base_")}


def cold_start(table: EPDTable, concentration: float, *, train_scale_dir: bool | None = None,
               train_scale_time: bool | None = None, scale_std: float = 0.05) -> ColdStart:
    """Base Dirichlet / log-normal parameters from a start table (spec §6.2).

    Args:
        table (:class:`~epd.predictor.EPDTable`): the start table (e.g. a Stage-1 distilled or uniform table).
        concentration (`float`): total concentration ``c`` of every row's Dirichlets (``alpha = c * segments``).
        train_scale_dir, train_scale_time (`bool`, *optional*): None: a scale head exists iff the table has that
            scale; True: force a head (base scale 1 where the table has none); False: no head.
        scale_std (`float`): initial standard deviation of the log-normal scale heads (in log space).

    Returns:
        :class:`ColdStart`.
    """
    if not (concentration > 0 and math.isfinite(concentration)):
        raise ConfigError(f"dirichlet_concentration: must be a positive number, got {concentration!r}")
    if not scale_std > 0:
        raise ConfigError(f"scale_std: must be > 0, got {scale_std!r}")
    s = sanitize_rows(table.positions, table.weights, table.scale_dir, table.scale_time)
    z = torch.zeros_like(s.positions[:, :1])
    seg = torch.diff(torch.cat([z, s.positions, torch.ones_like(z)], 1), dim=1)
    w = s.weights / s.weights.sum(1, keepdim=True)
    bad_seg = (seg <= DEGENERATE).any(1)
    bad_w = (w <= DEGENERATE).any(1)
    seg[bad_seg] = 1.0 / seg.shape[1]
    w[bad_w] = 1.0 / w.shape[1]
    out = ColdStart(torch.log(concentration * seg).float(), torch.log(concentration * w).float(),
                    reordered_rows=tuple(s.reordered), adjusted_rows=tuple(s.adjusted),
                    fallback_rows=tuple((bad_seg | bad_w).nonzero().flatten().tolist()))
    for name, have, force in (("dir", s.scale_dir, train_scale_dir), ("time", s.scale_time, train_scale_time)):
        if force is False or (force is None and have is None):
            continue
        base = torch.zeros_like(w) if have is None else torch.log(have)
        setattr(out, f"base_log_scale_{name}", base.float())
        setattr(out, f"base_log_std_{name}", torch.full_like(w, math.log(scale_std)).float())
    return out


# ---------------------------------------------------------------------- actions and sampled tables
@dataclass
class PolicyAction:
    """A batch of sampled tables, one per image. Tensors have shape ``(B, N-1, .)``.

    Attributes:
        segments (`torch.Tensor` `(B, N-1, K+1)`): position segments on the simplex.
        positions (`torch.Tensor` `(B, N-1, K)`): ``cumsum(segments)[..., :K]``.
        weights (`torch.Tensor` `(B, N-1, K)`): simplex weights.
        scale_dir, scale_time (`torch.Tensor` `(B, N-1, K)`, *optional*): sampled scales (None: no head).
    """

    segments: torch.Tensor
    positions: torch.Tensor
    weights: torch.Tensor
    scale_dir: torch.Tensor | None = None
    scale_time: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.positions.shape[0]

    def _map(self, fn) -> "PolicyAction":
        return PolicyAction(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                               for f in fields(self)})

    def detach(self) -> "PolicyAction":
        return self._map(torch.Tensor.detach)

    def to(self, *args, **kwargs) -> "PolicyAction":
        return self._map(lambda t: t.to(*args, **kwargs))

    def __getitem__(self, idx) -> "PolicyAction":
        """Select images (an index tensor, list or slice along the batch), e.g. for PPO minibatches."""
        return self._map(lambda t: t[idx])

    @staticmethod
    def cat(actions: list["PolicyAction"]) -> "PolicyAction":
        first = actions[0]
        return PolicyAction(**{f.name: None if getattr(first, f.name) is None else
                               torch.cat([getattr(a, f.name) for a in actions]) for f in fields(first)})

    def tables(self, meta: dict | None = None) -> "SampledTables":
        """The batch as a per-image table for ``epd.solvers.solve("epd", ..., table=...)``.

        Args:
            meta (`dict`, *optional*): metadata the solver reads (``afs``, ``max_order``); the original's RDPO
                rollouts ran with ``afs=False``, so pass the start table's metadata with ``afs`` set to False.
        """
        return SampledTables(self.positions, self.weights, self.scale_dir, self.scale_time, meta=meta)


class SampledTables:
    """One EPD table per image, usable wherever the solver takes a table.

    Args:
        positions, weights (`torch.Tensor` of shape `(B, N-1, K)`): per-image tables.
        scale_dir, scale_time (`torch.Tensor`, *optional*): per-image scales; None means ones.
        meta (`dict`, *optional*): metadata read by the solver (e.g. ``afs``); RDPO rollouts use ``afs=False``.
    """

    def __init__(self, positions, weights, scale_dir=None, scale_time=None, meta: dict | None = None):
        self.positions, self.weights = positions, weights
        self.scale_dir, self.scale_time = scale_dir, scale_time
        self.meta = dict(meta or {})
        if positions.dim() != 3 or weights.shape != positions.shape:
            raise ConfigError(f"SampledTables: positions {tuple(positions.shape)} and weights "
                              f"{tuple(weights.shape)} must both be (B, N-1, K)")

    @property
    def batch(self) -> int:
        return self.positions.shape[0]

    @property
    def num_steps(self) -> int:
        return self.positions.shape[1] + 1

    @property
    def num_points(self) -> int:
        return self.positions.shape[2]

    def row(self, n: int, dtype=torch.float32, device=None) -> dict[str, torch.Tensor]:
        """Row ``n`` for every image: ``(B, K)`` tensors (scales filled with ones)."""
        f = lambda t: t[:, n].to(dtype=dtype, device=device)  # noqa: E731
        ones = torch.ones(self.batch, self.num_points, dtype=dtype, device=device)
        return {"positions": f(self.positions), "weights": f(self.weights),
                "scale_dir": ones if self.scale_dir is None else f(self.scale_dir),
                "scale_time": ones if self.scale_time is None else f(self.scale_time)}

    def table(self, i: int) -> EPDTable:
        """Image ``i``'s table as an :class:`~epd.predictor.EPDTable` (float64)."""
        g = lambda t: None if t is None else t[i].detach().double().cpu()  # noqa: E731
        return EPDTable(g(self.positions), g(self.weights), g(self.scale_dir), g(self.scale_time), meta=self.meta)


# ---------------------------------------------------------------------- the policy
@dataclass
class StepDistributions:
    """Per-step distributions. Batch shape ``(S,)`` (or ``(B, S)`` with prompt context)."""

    positions: Dirichlet
    weights: Dirichlet
    scale_dir: LogNormal | None = None
    scale_time: LogNormal | None = None


class _ResidualBlock(nn.Module):
    """``h + W(SiLU(LayerNorm(h)))``."""

    def __init__(self, hidden: int):
        super().__init__()
        self.layer_norm = nn.LayerNorm(hidden)
        self.linear = nn.Linear(hidden, hidden)

    def forward(self, h):
        return h + self.linear(F.silu(self.layer_norm(h)))


class EPDParamPolicy(nn.Module):
    """Residual Dirichlet policy over EPD tables (spec §6.3).

    Args:
        base (:class:`ColdStart`): frozen base log-concentrations (and log-normal heads); see :func:`cold_start`.
        hidden_dim (`int`): width of the step embedding and residual blocks (original: 128).
        num_layers (`int`): number of residual blocks (original: 2).
        context_dim (`int`, *optional*): size of an optional per-image context vector (e.g. a prompt embedding)
            projected and added to the step embedding. Off by default (the original never used it).

    The output layer is zero-initialised, so a fresh policy's distributions are exactly the base ones.
    """

    def __init__(self, base: ColdStart, hidden_dim: int = 128, num_layers: int = 2, context_dim: int | None = None):
        super().__init__()
        bufs = base.buffers()
        for name, value in bufs.items():
            self.register_buffer(name, None if value is None else value.detach().clone().float())
        S, K1 = self.base_log_alpha_pos.shape
        K = K1 - 1
        if self.base_log_alpha_weight.shape != (S, K):
            raise ConfigError(f"EPDParamPolicy: base_log_alpha_weight {tuple(self.base_log_alpha_weight.shape)} "
                              f"does not match base_log_alpha_pos {(S, K1)} (expected {(S, K)})")
        self.heads = tuple(n for n in _SCALES if getattr(self, f"base_log_scale_{n}") is not None)
        for n in _SCALES:
            loc, std = getattr(self, f"base_log_scale_{n}"), getattr(self, f"base_log_std_{n}")
            if (loc is None) != (std is None) or (loc is not None and (loc.shape != (S, K) or std.shape != (S, K))):
                raise ConfigError(f"EPDParamPolicy: scale head '{n}' needs base_log_scale_{n} and base_log_std_{n} "
                                  f"both of shape {(S, K)}")
        self.num_steps, self.num_points = S + 1, K
        self.hidden_dim, self.num_layers, self.context_dim = hidden_dim, num_layers, context_dim
        self.step_embed = nn.Embedding(S, hidden_dim)
        self.blocks = nn.ModuleList(_ResidualBlock(hidden_dim) for _ in range(num_layers))
        self.output_linear = nn.Linear(hidden_dim, self.output_dim)
        nn.init.zeros_(self.output_linear.weight)
        nn.init.zeros_(self.output_linear.bias)
        self.context_proj = nn.Linear(context_dim, hidden_dim) if context_dim else None

    @property
    def output_dim(self) -> int:
        """``(K+1) + K + 2K`` per scale head (5 without heads, 13 with both, for K=2)."""
        return 2 * self.num_points + 1 + 2 * self.num_points * len(self.heads)

    # -- construction
    @classmethod
    def from_table(cls, table: EPDTable, concentration: float, *, hidden_dim: int = 128, num_layers: int = 2,
                   train_scale_dir: bool | None = None, train_scale_time: bool | None = None,
                   scale_std: float = 0.05, context_dim: int | None = None) -> "EPDParamPolicy":
        """Cold-start policy from a table; see :func:`cold_start` for the arguments."""
        base = cold_start(table, concentration, train_scale_dir=train_scale_dir,
                          train_scale_time=train_scale_time, scale_std=scale_std)
        policy = cls(base, hidden_dim=hidden_dim, num_layers=num_layers, context_dim=context_dim)
        # a scale the table has but the policy does not train stays at the table's value (not 1): every sampled
        # table and the exported mean carry it
        policy.fixed_scales = {n: getattr(table, f"scale_{n}").detach().float().clone() for n in _SCALES
                               if n not in policy.heads and getattr(table, f"scale_{n}") is not None}
        policy.cold_start_info = {"reordered_rows": list(base.reordered_rows),
                                  "adjusted_rows": list(base.adjusted_rows),
                                  "fallback_rows": list(base.fallback_rows)}
        return policy

    @classmethod
    def from_state_dict(cls, state: dict, source: str = "state dict") -> "EPDParamPolicy":
        """Rebuild a policy from its ``state_dict`` (the original's ``policy-step*.pt`` or ours), inferring the
        architecture (steps, K, hidden size, number of blocks, scale heads, context) from the keys and shapes,
        then loading strictly.

        Raises:
            EPDError: missing/unknown keys or inconsistent shapes (the message names ``source``).
        """
        if not isinstance(state, dict) or "base_log_alpha_pos" not in state or "step_embed.weight" not in state:
            keys = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
            raise EPDError(f"{source}: not an EPD policy state dict (keys {keys}); expected base_log_alpha_pos, "
                           "step_embed.weight, blocks.*, output_linear.*")
        heads = {f"base_log_{k}_{n}": state.get(f"base_log_{k}_{n}") for n in _SCALES for k in ("scale", "std")}
        base = ColdStart(state["base_log_alpha_pos"], state.get("base_log_alpha_weight", torch.empty(0)), **heads)
        hidden = state["step_embed.weight"].shape[1]
        layers = len({m.group(1) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
        ctx = state["context_proj.weight"].shape[1] if "context_proj.weight" in state else None
        try:
            policy = cls(base, hidden_dim=hidden, num_layers=layers, context_dim=ctx)
            if state["step_embed.weight"].shape[0] != policy.num_steps - 1:
                raise ConfigError(f"step_embed.weight has {state['step_embed.weight'].shape[0]} rows, "
                                  f"base_log_alpha_pos has {policy.num_steps - 1}")
            policy.load_state_dict(state, strict=True)
        except (ConfigError, RuntimeError) as e:
            raise EPDError(f"{source}: inconsistent policy state dict ({str(e).strip()[:400]})") from None
        return policy

    # -- distribution parameters
    def _hidden(self, step_idx, context):
        if step_idx is None:
            step_idx = torch.arange(self.num_steps - 1, device=self.step_embed.weight.device)
        h = self.step_embed(torch.as_tensor(step_idx, device=self.step_embed.weight.device))
        if context is not None:
            if self.context_proj is None:
                raise ConfigError("context: this policy was built without context_dim")
            h = h.unsqueeze(0) + self.context_proj(context).unsqueeze(-2)
        for block in self.blocks:
            h = block(h)
        return h, step_idx

    def forward(self, step_idx=None, context=None) -> dict[str, torch.Tensor]:
        """Distribution parameters for the given steps (default: all steps).

        Args:
            step_idx (`torch.LongTensor` of shape `(S,)`, *optional*): coarse-step indices; default ``0..N-2``.
            context (`torch.Tensor` of shape `(B, context_dim)`, *optional*): per-image context (only for policies
                built with ``context_dim``); adds a leading batch dimension to every output.

        Returns:
            `dict` with ``alpha_pos`` `(.., S, K+1)`, ``alpha_weight`` `(.., S, K)` and, per scale head ``n`` in
            :attr:`heads`, ``loc_<n>`` / ``log_std_<n>`` `(.., S, K)` (log-space mean and clamped log-std).
            Pass this dict as ``params=`` to the methods below to reuse one forward pass (e.g. under DDP, whose
            gradient hooks need the call to go through the wrapper).
        """
        h, idx = self._hidden(step_idx, context)
        delta = self.output_linear(h)
        K = self.num_points
        out = {"alpha_pos": torch.exp(self.base_log_alpha_pos[idx] + delta[..., :K + 1]).clamp(min=MIN_ALPHA),
               "alpha_weight": torch.exp(self.base_log_alpha_weight[idx]
                                         + delta[..., K + 1:2 * K + 1]).clamp(min=MIN_ALPHA)}
        at = 2 * K + 1
        for n in self.heads:
            out[f"loc_{n}"] = getattr(self, f"base_log_scale_{n}")[idx] + delta[..., at:at + K]
            out[f"log_std_{n}"] = torch.clamp(getattr(self, f"base_log_std_{n}")[idx] + delta[..., at + K:at + 2 * K],
                                              *LOG_STD_RANGE)
            at += 2 * K
        return out

    def _dists(self, p: dict) -> StepDistributions:
        ln = {n: LogNormal(p[f"loc_{n}"], torch.exp(p[f"log_std_{n}"])) for n in self.heads}
        return StepDistributions(Dirichlet(p["alpha_pos"]), Dirichlet(p["alpha_weight"]),
                                 ln.get("dir"), ln.get("time"))

    def distributions(self, step_idx=None, context=None, params: dict | None = None) -> StepDistributions:
        """``torch.distributions`` objects for the given steps (batch shape ``(S,)``, or ``(B, S)`` with context).

        Args:
            step_idx, context: as in :meth:`forward`.
            params (`dict`, *optional*): output of :meth:`forward` to use instead of calling it.
        """
        return self._dists(params if params is not None else self(step_idx, context))

    def base_distributions(self) -> StepDistributions:
        """The frozen cold-start distributions (what :meth:`kl_to_base` compares against)."""
        p = {"alpha_pos": torch.exp(self.base_log_alpha_pos).clamp(min=MIN_ALPHA),
             "alpha_weight": torch.exp(self.base_log_alpha_weight).clamp(min=MIN_ALPHA)}
        for n in self.heads:
            p[f"loc_{n}"] = getattr(self, f"base_log_scale_{n}")
            p[f"log_std_{n}"] = torch.clamp(getattr(self, f"base_log_std_{n}"), *LOG_STD_RANGE)
        return self._dists(p)

    # -- sampling and scoring
    @torch.no_grad()
    def sample(self, batch: int, generator: torch.Generator | None = None, context=None) -> PolicyAction:
        """Draw ``batch`` tables (detached).

        Args:
            batch (`int`): number of images.
            generator (`torch.Generator`, *optional*): source of randomness; the same generator state gives the
                same tables, and the global RNG is left untouched. Without it the global RNG is used.
            context (`torch.Tensor` `(batch, context_dim)`, *optional*): per-image context.

        Returns:
            :class:`PolicyAction` with tensors ``(batch, N-1, .)`` in the policy's dtype and device. Segments and
            weights are floored at ``MIN_SAMPLE`` and renormalised, so positions are strictly increasing and
            log-probabilities finite.
        """
        if context is not None and context.shape[0] != batch:
            raise ConfigError(f"context: has {context.shape[0]} rows for batch {batch}")
        d = self.distributions(context=context)
        shape = () if context is not None else (batch,)
        device = self.base_log_alpha_pos.device
        if generator is None:
            draws = self._draw(d, shape)
        else:
            # torch.distributions samplers take no generator: seed a forked RNG from it instead.
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
            cuda = device.type == "cuda"
            devices = [device.index if device.index is not None else torch.cuda.current_device()] if cuda else []
            with torch.random.fork_rng(devices=devices):  # only the RNG we reseed is touched, and restored
                if cuda:
                    with torch.cuda.device(devices[0]):
                        torch.cuda.manual_seed(seed)
                else:
                    torch.random.default_generator.manual_seed(seed)
                draws = self._draw(d, shape)
        seg = _floor_simplex(draws["seg"])
        w = _floor_simplex(draws["w"])
        fixed = getattr(self, "fixed_scales", {})
        for n in _SCALES:
            if draws.get(n) is None and n in fixed:
                draws[n] = fixed[n].to(w).expand(w.shape)
        return PolicyAction(seg, torch.cumsum(seg, -1)[..., :-1], w, draws.get("dir"), draws.get("time"))

    @staticmethod
    def _draw(d: StepDistributions, shape) -> dict:
        out = {"seg": d.positions.sample(shape), "w": d.weights.sample(shape)}
        for n, ln in (("dir", d.scale_dir), ("time", d.scale_time)):
            if ln is not None:
                out[n] = ln.sample(shape)
        return out

    def log_prob(self, action: PolicyAction, context=None, params: dict | None = None) -> torch.Tensor:
        """``log pi(action)`` per image, summed over steps, points and heads.

        Args:
            action (:class:`PolicyAction`): sampled tables (``B`` images).
            context (`torch.Tensor`, *optional*): the context the action was sampled with.
            params (`dict`, *optional*): output of :meth:`forward` to use instead of calling it.

        Returns:
            `torch.Tensor` of shape `(B,)` (differentiable w.r.t. the policy's parameters).
        """
        d = self.distributions(context=context, params=params)
        lp = d.positions.log_prob(action.segments).sum(-1) + d.weights.log_prob(action.weights).sum(-1)
        for n, ln in (("dir", d.scale_dir), ("time", d.scale_time)):
            if ln is not None:
                a = getattr(action, f"scale_{n}")
                if a is None:
                    raise ConfigError(f"log_prob: the policy has a scale_{n} head but the action has no scale_{n}")
                lp = lp + ln.log_prob(a).sum((-2, -1))
        return lp

    def entropy(self, context=None, params: dict | None = None) -> torch.Tensor:
        """Analytic entropy of one action (Dirichlets + log-normals summed over steps).

        Returns:
            scalar `torch.Tensor` (shape `(B,)` with context).
        """
        return self._sum_steps(self.distributions(context=context, params=params), lambda x: x.entropy())

    def kl_to_base(self, context=None, params: dict | None = None) -> torch.Tensor:
        """Analytic ``KL(pi || pi_base)`` of one action, summed over steps (log-normal KL = normal KL of logs).

        Returns:
            scalar `torch.Tensor` (shape `(B,)` with context); 0 for a fresh policy.
        """
        d, b = self.distributions(context=context, params=params), self.base_distributions()
        kl = kl_divergence(d.positions, b.positions).sum(-1) + kl_divergence(d.weights, b.weights).sum(-1)
        for ln, lb in ((d.scale_dir, b.scale_dir), (d.scale_time, b.scale_time)):
            if ln is not None:
                kl = kl + kl_divergence(Normal(ln.loc, ln.scale), Normal(lb.loc, lb.scale)).sum((-2, -1))
        return kl

    @staticmethod
    def _sum_steps(d: StepDistributions, f) -> torch.Tensor:
        out = f(d.positions).sum(-1) + f(d.weights).sum(-1)
        for ln in (d.scale_dir, d.scale_time):
            if ln is not None:
                out = out + f(ln).sum((-2, -1))
        return out

    # -- mean table
    @torch.no_grad()
    def mean_table(self, meta: dict | None = None, provenance: dict | None = None) -> EPDTable:
        """The policy mean as a table (float64): positions ``cumsum(alpha_pos / sum)[:K]``, weights
        ``alpha_w / sum``, scales the log-normal means ``exp(mu + sigma^2 / 2)``.

        Args:
            meta (`dict`, *optional*): metadata for the table (e.g. the start table's).
            provenance (`dict`, *optional*): provenance for the table.
        """
        p = {k: v.double() for k, v in self().items()}
        seg = p["alpha_pos"] / p["alpha_pos"].sum(-1, keepdim=True)
        w = p["alpha_weight"] / p["alpha_weight"].sum(-1, keepdim=True)
        scales = {n: torch.exp(p[f"loc_{n}"] + 0.5 * torch.exp(2 * p[f"log_std_{n}"])) for n in self.heads}
        scales.update({n: v.double() for n, v in getattr(self, "fixed_scales", {}).items()})
        pos = torch.cumsum(seg, -1)[:, :-1]
        return EPDTable(pos.cpu(), w.cpu(), *(None if scales.get(n) is None else scales[n].cpu() for n in _SCALES),
                        meta=dict(meta or {}), provenance=dict(provenance or {}))

    def describe(self) -> dict:
        """Architecture summary (for logs and manifests)."""
        return {"num_steps": self.num_steps, "num_points": self.num_points, "hidden_dim": self.hidden_dim,
                "num_layers": self.num_layers, "scale_heads": list(self.heads), "context_dim": self.context_dim,
                "output_dim": self.output_dim}


def _floor_simplex(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(min=MIN_SAMPLE)
    return x / x.sum(-1, keepdim=True)


