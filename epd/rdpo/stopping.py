"""When to stop RDPO: a plateau rule on the paired held-out evaluation.

Every held-out evaluation scores the policy mean on the same prompts and seeds, so two evaluations can be
compared seed by seed. :class:`PlateauStopper` keeps a *reference* evaluation (the start table, then the last
evaluation that made progress). An evaluation makes progress when its paired gain over the reference,
``mean(r - r_ref) / SE`` with ``SE = std(r - r_ref) / sqrt(n)``, is at least ``min_gain_se`` standard errors
and the checkpoint passes the guard; it then becomes the reference. After ``patience`` evaluations in a row
without progress, training stops. Gains are measured against the reference, not the previous evaluation, so
a slow but steady climb still counts once it adds up to ``min_gain_se``.

The stopper only decides when to stop; the exported ``table_best`` is still the best guarded checkpoint.
``patience=0`` turns the rule off (the run spends its whole ``steps`` budget, today's behaviour).
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError

__all__ = ["PlateauStopper", "paired_gain_se"]


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


class PlateauStopper:
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

    def start(self, rewards: torch.Tensor, step: int = 0) -> None:
        """The first reference: the start table's held-out scores."""
        self.ref, self.ref_step = rewards.detach().double().cpu().clone(), int(step)

    def update(self, step: int, rewards: torch.Tensor, guard_ok: bool = True) -> bool:
        """Record the evaluation after ``step``; True when training should stop now."""
        if self.ref is None:
            raise ConfigError("PlateauStopper.update: call start() with the start table's scores first")
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
