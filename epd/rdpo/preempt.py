"""Preemption: SIGTERM or SIGUSR1 asks a running ``epd rdpo`` to checkpoint and leave.

The contract a scheduler (SLURM ``--signal``, a requeue harness) relies on:

1. the signal is caught, the current PPO step finishes;
2. a resumable checkpoint (policy, optimiser, every RNG state, step, stopping state, metrics so far) is written
   atomically into the run folder;
3. the process exits with ``128 + signal`` (143 for SIGTERM, 138 for SIGUSR1);
4. running the same command again resumes from that checkpoint, and the final tables are byte-identical to an
   uninterrupted run's.
"""

from __future__ import annotations

import signal

__all__ = ["PreemptSignal", "PREEMPT_SIGNALS", "exit_code"]

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by ``signum``: 143 for SIGTERM, 138 for SIGUSR1."""
    return 128 + int(signum)


class PreemptSignal:
    """Context manager that records the first preemption signal instead of dying on it.

    ``signum`` is None until a signal arrives. Handlers are installed on entry (main thread only) and the
    previous ones restored on exit. A second signal is only recorded once; the step still finishes.
    """

    def __init__(self, signals=PREEMPT_SIGNALS):
        self.signals, self.signum, self._old = tuple(signals), None, {}

    def _handler(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        if self.signum is None:
            self.signum = int(signum)

    def __enter__(self) -> "PreemptSignal":
        for s in self.signals:
            self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()
