"""Progress lines for logs that are files: a job under Snakemake writes its stderr to ``logs/``, where a tqdm bar
(disabled off a terminal) shows nothing for minutes. :class:`Heartbeat` logs one line at most every ``every_s``
seconds, and at the last step, with the rate and the time left."""

from __future__ import annotations

import logging
import time

__all__ = ["Heartbeat"]


class Heartbeat:
    """Log ``what: done/total (pct), rate, ETA, extra`` at most every ``every_s`` seconds.

    Args:
        what (`str`): the job's name in the line (e.g. ``"digits denoiser"``).
        total (`int`): number of steps.
        start (`int`): steps already done (a resumed job).
        every_s (`float`): minimum seconds between two lines (the last step is always logged).
        logger (`logging.Logger`, *optional*): where to log (default: this module's logger).
    """

    def __init__(self, what: str, total: int, start: int = 0, every_s: float = 30.0,
                 logger: logging.Logger | None = None, clock=time.monotonic):
        self.what, self.total, self.start, self.every_s = what, total, start, every_s
        self.log = logger or logging.getLogger(__name__)
        self.clock = clock
        self.t0 = self.last = clock()

    def __call__(self, done: int, **extra) -> bool:
        """Report step ``done``; returns True when a line was logged."""
        now = self.clock()
        if now - self.last < self.every_s and done < self.total:
            return False
        self.last = now
        rate = (done - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        info = "".join(f", {k} {v:.4g}" if isinstance(v, float) else f", {k} {v}" for k, v in extra.items())
        self.log.info("%s: %d/%d (%.0f%%), %.3g steps/s, %.0f s elapsed, ETA %.0f s%s", self.what, done, self.total,
                      100.0 * done / max(self.total, 1), rate, now - self.t0, eta, info)
        return True
