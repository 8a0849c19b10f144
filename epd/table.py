"""The EPD parameter table: per coarse step, K intermediate positions, K simplex weights, optional scales.

Vocabulary: ``N`` grid points (both ends counted), ``N - 1`` coarse steps, ``K`` parallel points per step. The
metadata keeps the original's names: ``num_steps`` is ``N`` and ``num_points`` is ``K`` (:attr:`EPDTable.N` and
:attr:`EPDTable.K` read them under the short names).

A table for ``N`` grid points has ``N - 1`` rows. Row ``n`` holds

* ``positions[n]`` ``r_1 < ... < r_K`` in ``(0, 1)``, stored canonically as the ``K + 1`` simplex segments
  ``diff([0, r_1, ..., r_K, 1])``; point ``k`` sits at ``s_k = sigma_{n+1}^{r_k} sigma_n^{1 - r_k}``;
* ``weights[n]`` on the simplex (``sum = 1``, all ``> 0``);
* optional multiplicative ``scale_dir[n]`` (``c_k``, rescales the slope) and ``scale_time[n]`` (``a_k``,
  perturbs only the network's time input), 1 meaning "off".

Files: :mod:`epd.predictor` reads and writes the native format, :mod:`epd.legacy` the original's ``.pkl``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import ConfigError

__all__ = ["EPDTable", "META_FIELDS", "SIMPLEX_TOL", "uniform_table", "check_compatible"]

# Metadata a table carries (spec §5.2, DESIGN.md). Missing keys default to None.
META_FIELDS = (
    "backbone", "backbone_config", "dataset_name", "img_resolution", "num_steps", "num_points",
    "guidance_type", "guidance_rate", "schedule_type", "schedule_rho", "sigma_min", "sigma_max",
    "flowmatch_mu", "flowmatch_shift", "afs", "coords", "scale_dir", "scale_time", "max_order",
    "predict_x0", "lower_order_final", "sampler_stu", "sampler_tea", "M", "fcn", "alpha",
)

SIMPLEX_TOL = 1e-5  # weights' row sums may differ from 1 by this much


@dataclass
class EPDTable:
    """An EPD parameter table with its metadata.

    Args:
        positions (`torch.Tensor` of shape `(N-1, K)`): strictly increasing per row, in ``(0, 1)``.
        weights (`torch.Tensor` of shape `(N-1, K)`): rows on the simplex.
        scale_dir (`torch.Tensor`, *optional*): direction scales ``c``; None means all ones.
        scale_time (`torch.Tensor`, *optional*): time scales ``a``; None means all ones.
        meta (`dict`): metadata (see :data:`META_FIELDS`); ``num_steps``/``num_points`` are filled from shapes.
        provenance (`dict`): where the table came from (source file, run, step, sanitised rows, ...).
    """

    positions: torch.Tensor
    weights: torch.Tensor
    scale_dir: torch.Tensor | None = None
    scale_time: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    def __post_init__(self):
        self.positions = torch.as_tensor(self.positions, dtype=torch.float64).clone()
        self.weights = torch.as_tensor(self.weights, dtype=torch.float64).clone()
        for name in ("scale_dir", "scale_time"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, torch.as_tensor(v, dtype=torch.float64).clone())
        self.meta = {k: self.meta.get(k) for k in META_FIELDS} | {k: v for k, v in self.meta.items()}
        self.meta["num_steps"] = self.num_steps
        self.meta["num_points"] = self.num_points
        self.validate()

    # ------------------------------------------------------------------ shape
    @property
    def num_steps(self) -> int:
        """Grid points ``N`` (both endpoints counted, as the original's ``num_steps``)."""
        return self.positions.shape[0] + 1

    @property
    def num_points(self) -> int:
        """Points per step ``K`` (the original's ``num_points``)."""
        return self.positions.shape[1]

    @property
    def N(self) -> int:
        """Grid points ``N`` the table is for (read-only; the metadata and files call it ``num_steps``)."""
        return self.num_steps

    @property
    def K(self) -> int:
        """Parallel points per coarse step ``K`` (read-only; the metadata and files call it ``num_points``)."""
        return self.num_points

    def segments(self) -> torch.Tensor:
        """``(N-1, K+1)`` simplex segments whose cumulative sums are the positions."""
        z = torch.zeros_like(self.positions[:, :1])
        return torch.diff(torch.cat([z, self.positions, torch.ones_like(z)], 1), dim=1)

    @classmethod
    def from_segments(cls, segments: torch.Tensor, weights: torch.Tensor, **kw) -> "EPDTable":
        segments = torch.as_tensor(segments, dtype=torch.float64)
        return cls(torch.cumsum(segments, 1)[:, :-1], weights, **kw)

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        p, w = self.positions, self.weights
        if p.dim() != 2 or w.shape != p.shape:
            raise ConfigError(f"EPD table: positions {tuple(p.shape)} and weights {tuple(w.shape)} must both be (N-1, K)")
        if p.shape[0] < 1 or p.shape[1] < 1:
            raise ConfigError(f"EPD table: need at least one step and K >= 1 points, got shape {tuple(p.shape)}")
        if not (torch.isfinite(p).all() and torch.isfinite(w).all()):
            raise ConfigError("EPD table: positions/weights contain NaN or inf")
        if not ((p > 0).all() and (p < 1).all()):
            raise ConfigError(f"EPD table: positions must lie in (0, 1); got min {p.min():.3g}, max {p.max():.3g}")
        if p.shape[1] > 1 and not (torch.diff(p, dim=1) > 0).all():
            bad = (torch.diff(p, dim=1) <= 0).any(1).nonzero().flatten().tolist()
            raise ConfigError(f"EPD table: positions must be strictly increasing in every row; rows {bad} are not "
                              "(sort each row with EPDTable.sort_rows)")
        if (w <= 0).any() or ((w.sum(1) - 1).abs() > SIMPLEX_TOL).any():
            raise ConfigError(f"EPD table: weights must be positive and sum to 1 per row; row sums {w.sum(1).tolist()}")
        for name in ("scale_dir", "scale_time"):
            v = getattr(self, name)
            if v is not None and (v.shape != p.shape or not torch.isfinite(v).all() or (v <= 0).any()):
                raise ConfigError(f"EPD table: {name} must be positive and finite with shape {tuple(p.shape)}")

    @staticmethod
    def sort_rows(positions, weights, scale_dir=None, scale_time=None):
        """Sort each row's points by position, permuting weights and scales alongside (EPD is invariant to
        the order of its points). Returns the sorted tensors and the number of reordered rows."""
        order = torch.argsort(positions, dim=1)
        reordered = int((order != torch.arange(positions.shape[1])).any(1).sum())
        g = lambda t: None if t is None else torch.gather(torch.as_tensor(t), 1, order)  # noqa: E731
        return g(positions), g(weights), g(scale_dir), g(scale_time), reordered

    # ------------------------------------------------------------------ views
    def row(self, n: int, dtype=torch.float32, device=None) -> dict[str, torch.Tensor]:
        """Row ``n`` as tensors (positions, weights, scale_dir, scale_time), scales filled with ones."""
        ones = torch.ones(self.num_points, dtype=dtype, device=device)
        f = lambda t: ones if t is None else t[n].to(dtype=dtype, device=device)  # noqa: E731
        return {"positions": self.positions[n].to(dtype=dtype, device=device),
                "weights": self.weights[n].to(dtype=dtype, device=device),
                "scale_dir": f(self.scale_dir), "scale_time": f(self.scale_time)}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"positions": self.positions, "weights": self.weights}
        if self.scale_dir is not None:
            out["scale_dir"] = self.scale_dir
        if self.scale_time is not None:
            out["scale_time"] = self.scale_time
        return out

    def summary(self) -> str:
        """What ``epd predictor show`` prints (:func:`epd.table_text.summary_text`)."""
        from .table_text import summary_text

        return summary_text(self.meta, self.provenance, self.tensors())

    def equal(self, other: "EPDTable", atol: float = 0.0) -> bool:
        a, b = self.tensors(), other.tensors()
        return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


def uniform_table(num_steps: int, num_points: int, *, r_base: float = 0.5, r_eps: float = 0.33,
                  meta: dict | None = None) -> EPDTable:
    """Cold-start table like the original's ``fake_train.py``: positions ``r_base + (k - (K-1)/2) * r_eps``
    (clipped to ``[1e-4, 1 - 1e-4]``, strictly increasing), uniform weights, no scales.

    ``K = 1`` alternates ``r_base +- r_eps`` by row, as the original does.
    """
    if num_steps < 2:
        raise ConfigError(f"num_steps: need at least 2 grid points, got {num_steps}")
    if num_points < 1:
        raise ConfigError(f"num_points: K must be >= 1, got {num_points}")
    rows = []
    for n in range(num_steps - 1):
        if num_points == 1:
            r = [r_base + (r_eps if n % 2 == 0 else -r_eps)]
        else:
            r = [r_base + (k - (num_points - 1) / 2) * r_eps for k in range(num_points)]
        r = [min(max(v, 1e-4), 1 - 1e-4) for v in r]
        for k in range(1, len(r)):
            r[k] = max(r[k], r[k - 1] + 1e-4)
        rows.append(r)
    pos = torch.tensor(rows, dtype=torch.float64)
    w = torch.full_like(pos, 1.0 / num_points)
    return EPDTable(pos, w, meta=dict(meta or {}))


def check_compatible(table: EPDTable, *, backbone: str | None = None, num_steps: int | None = None,
                     num_points: int | None = None, schedule_type: str | None = None,
                     img_resolution: int | None = None) -> None:
    """Raise :class:`ConfigError` naming each field where the table's metadata contradicts the run's settings."""
    checks = {"backbone": backbone, "num_steps": num_steps, "num_points": num_points,
              "schedule_type": schedule_type, "img_resolution": img_resolution}
    problems = []
    for key, want in checks.items():
        have = table.num_steps if key == "num_steps" else table.num_points if key == "num_points" else table.meta.get(key)
        if want is not None and have is not None and have != want:
            problems.append(f"{key}: snapshot has {have!r}, run expects {want!r}")
    if problems:
        raise ConfigError("snapshot does not match the run: " + "; ".join(problems))
