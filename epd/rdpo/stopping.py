"""When to stop RDPO: a plateau rule on the paired held-out evaluation.

Every held-out evaluation scores the policy mean on the same prompts and seeds, so two evaluations can be
compared seed by seed. :class:`PlateauStopper` keeps a *reference* evaluation (the start table, then the last
evaluation that made progress). An evaluation makes progress when its paired gain over the reference,
``mean(r - r_ref) / SE`` with ``SE = std(r - r_ref) / sqrt(n)``, is at least ``min_gain_se`` standard errors
and the checkpoint passes the guard; it then becomes the reference. After ``patience`` evaluations in a row
without progress, training stops. Gains are measured against the reference, not the previous evaluation, so
a slow but steady climb still counts once it adds up to ``min_gain_se``.

:class:`TrendStopper` (``rdpo.stop_rule: trend``) asks instead whether the curve is still rising: the
least-squares slope of the mean held-out reward against the step over the last ``window`` evaluations that pass the
guard, with its standard error from the scatter of those evaluations around the line; training stops once
``slope + slope_se * SE(slope) <= 0``. On digits the paired SE of one evaluation is far smaller than the way the
policy's mean table wobbles from one checkpoint to the next, so a new best checkpoint is mostly a lucky wobble and
"no new best for ``patience`` evaluations" can end a slow climb early; the trend rule measures its noise on that
wobble.

The stopper only decides when to stop; the exported ``table_best`` is still the best guarded checkpoint.
``patience=0`` with the plateau rule turns stopping off (the run spends its whole ``steps`` budget, the default).
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError

__all__ = ["PlateauStopper", "TrendStopper", "make_stopper", "paired_gain_se", "slope_with_se", "RECORD_KEYS",
           "STOP_KEYS", "STOP_RULES"]

STOP_KEYS = ("stop_rule", "stop_patience", "stop_min_gain_se", "stop_window", "stop_slope_se")  # rdpo config keys
# the keys stop.json records per rule (plateau: without stop_rule, as before the trend rule existed)
RECORD_KEYS = {"plateau": ("stop_patience", "stop_min_gain_se"), "trend": ("stop_rule", "stop_window", "stop_slope_se")}
STOP_RULES = tuple(RECORD_KEYS)


def paired_gain_se(new: torch.Tensor, ref: torch.Tensor) -> float:
    """``mean(new - ref)`` in standard errors of the paired difference (``inf``/``0`` when the SE is 0)."""
    if new.numel() != ref.numel():
        raise ConfigError(f"held-out evaluation: {new.numel()} scores against {ref.numel()} for the reference")
    d = new.double().reshape(-1) - ref.double().reshape(-1)
    mean = float(d.mean())
    se = float(d.std(unbiased=True)) / math.sqrt(d.numel()) if d.numel() > 1 else 0.0
    if se == 0.0:
        return math.inf if mean > 0 else 0.0
    return mean / se


class _ReferenceStopper:
    """What both rules share: the held-out scores each evaluation's paired gain is measured against."""

    ref: torch.Tensor | None = None
    ref_step: int = 0

    def start(self, rewards: torch.Tensor, step: int = 0) -> None:
        """The reference: the start table's held-out scores (the plateau rule moves it on progress)."""
        self.ref, self.ref_step = rewards.detach().double().cpu().clone(), int(step)

    def _require_start(self) -> None:
        if self.ref is None:
            raise ConfigError(f"{type(self).__name__}.update: call start() with the start table's scores first")


class PlateauStopper(_ReferenceStopper):
    """Patience rule over paired held-out evaluations (see the module docstring).

    Args:
        patience (`int`): evaluations without progress before stopping; 0 turns the rule off.
        min_gain_se (`float`): progress threshold, in standard errors of the paired gain over the reference.
    """

    def __init__(self, patience: int = 0, min_gain_se: float = 0.0):
        if int(patience) < 0:
            raise ConfigError(f"rdpo.stop_patience: must be >= 0 (0 = off), got {patience}")
        if not math.isfinite(float(min_gain_se)) or float(min_gain_se) < 0:
            raise ConfigError(f"rdpo.stop_min_gain_se: must be a finite number >= 0, got {min_gain_se}")
        self.patience, self.min_gain_se = int(patience), float(min_gain_se)
        self.ref: torch.Tensor | None = None
        self.ref_step, self.waited, self.stopped_at, self.reason = 0, 0, None, None
        self.log: list[dict] = []

    @property
    def enabled(self) -> bool:
        return self.patience > 0

    def update(self, step: int, rewards: torch.Tensor, guard_ok: bool = True) -> bool:
        """Record the evaluation after ``step``; True when training should stop now."""
        self._require_start()
        gain = paired_gain_se(rewards, self.ref)
        progress = bool(guard_ok) and gain >= self.min_gain_se and gain > 0
        self.log.append({"step": int(step), "ref_step": self.ref_step, "gain_se": gain, "guard_ok": bool(guard_ok),
                         "progress": progress})
        if progress:
            self.start(rewards, step)
            self.waited = 0
        else:
            self.waited += 1
        if self.enabled and self.waited >= self.patience and self.stopped_at is None:
            self.stopped_at = int(step)
            self.reason = (f"plateau: no held-out gain of >= {self.min_gain_se:g} SE over step {self.ref_step} "
                           f"in {self.waited} evaluation(s)")
        return self.stopped_at is not None

    def state_dict(self) -> dict:
        return {"ref": self.ref, "ref_step": self.ref_step, "waited": self.waited, "stopped_at": self.stopped_at,
                "reason": self.reason, "log": [dict(e) for e in self.log]}

    def load_state_dict(self, st: dict) -> None:
        self.ref, self.ref_step, self.waited = st["ref"], int(st["ref_step"]), int(st["waited"])
        self.stopped_at, self.reason, self.log = st["stopped_at"], st["reason"], [dict(e) for e in st["log"]]


def slope_with_se(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares slope of ``y`` on ``x`` and its standard error (residual variance on ``n - 2`` degrees of
    freedom); needs at least 3 distinct ``x``."""
    xt, yt = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    dx, dy = xt - xt.mean(), yt - yt.mean()
    sxx = float((dx * dx).sum())
    b = float((dx * dy).sum()) / sxx
    res = dy - b * dx
    return b, math.sqrt(float((res * res).sum()) / (len(x) - 2) / sxx)


class TrendStopper(_ReferenceStopper):
    """Stop once the held-out curve no longer rises (see the module docstring).

    Args:
        window (`int`): guarded evaluations in the slope fit (>= 3).
        slope_se (`float`): stop when ``slope + slope_se * SE(slope) <= 0``; larger waits for firmer evidence.
    """

    def __init__(self, window: int = 6, slope_se: float = 1.0):
        if int(window) != window or int(window) < 3:
            raise ConfigError(f"rdpo.stop_window: must be an integer >= 3 (a slope and its SE need 3 points), "
                              f"got {window}")
        if not math.isfinite(float(slope_se)) or float(slope_se) < 0:
            raise ConfigError(f"rdpo.stop_slope_se: must be a finite number >= 0, got {slope_se}")
        self.window, self.slope_se = int(window), float(slope_se)
        self.ref: torch.Tensor | None = None
        self.ref_step, self.points, self.stopped_at, self.reason = 0, [], None, None
        self.log: list[dict] = []

    enabled = True

    def update(self, step: int, rewards: torch.Tensor, guard_ok: bool = True) -> bool:
        """Record the evaluation after ``step``; True when training should stop now."""
        self._require_start()
        entry = {"step": int(step), "gain_se": paired_gain_se(rewards, self.ref), "guard_ok": bool(guard_ok)}
        if guard_ok:
            self.points.append((int(step), float(rewards.double().mean())))
        if guard_ok and len(self.points) >= self.window:
            x, y = zip(*self.points[-self.window:])
            b, se = slope_with_se(list(x), list(y))
            entry.update(slope=b, slope_se=se, upper=b + self.slope_se * se)
            if entry["upper"] <= 0 and self.stopped_at is None:
                self.stopped_at = int(step)
                self.reason = (f"trend: held-out reward slope {b:.3g} +- {se:.3g} per step over the last "
                               f"{self.window} guarded evaluations (steps {x[0]}-{x[-1]}): no rise at "
                               f"{self.slope_se:g} SE")
        self.log.append(entry)
        return self.stopped_at is not None

    def state_dict(self) -> dict:
        return {"ref": self.ref, "ref_step": self.ref_step, "points": [list(p) for p in self.points],
                "stopped_at": self.stopped_at, "reason": self.reason, "log": [dict(e) for e in self.log]}

    def load_state_dict(self, st: dict) -> None:
        self.ref, self.ref_step = st["ref"], int(st["ref_step"])
        self.points = [(int(a), float(b)) for a, b in st["points"]]
        self.stopped_at, self.reason, self.log = st["stopped_at"], st["reason"], [dict(e) for e in st["log"]]


def make_stopper(stop_rule: str = "plateau", stop_patience: int = 0, stop_min_gain_se: float = 0.0,
                 stop_window: int = 6, stop_slope_se: float = 1.0):
    """The stopper the ``rdpo.stop_*`` keys ask for (each key is validated, used or not, so a typo fails early)."""
    if stop_rule not in STOP_RULES:
        raise ConfigError(f"rdpo.stop_rule: {stop_rule!r}; accepted: 'plateau' (stop_patience, stop_min_gain_se; "
                          "patience 0 = off) or 'trend' (stop_window, stop_slope_se)")
    plateau, trend = PlateauStopper(stop_patience, stop_min_gain_se), TrendStopper(stop_window, stop_slope_se)
    return trend if stop_rule == "trend" else plateau
