"""GPU memory: an out-of-memory error that names the batch setting to lower.

A stage's peak memory is set by its batch settings (``teacher.batch``, ``distill.micro_batch``, ``rdpo.eval_batch``,
``sample.batch``, ``epd evaluate --batch-size``), not by its counts. :func:`out_of_memory_names` turns CUDA's
out-of-memory error inside a batch into an :class:`EPDError` naming that setting, its value and a smaller one to try.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from .errors import EPDError

__all__ = ["out_of_memory_names", "is_out_of_memory"]


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's allocator error (``torch.OutOfMemoryError``), recognised without importing torch."""
    return type(e).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(e)


@contextlib.contextmanager
def out_of_memory_names(setting: str, value: int, what: str) -> Iterator[None]:
    """Run a batch; on GPU out-of-memory raise an :class:`EPDError` saying to lower ``setting``."""
    try:
        yield
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EPDError(f"{what}: out of GPU memory at {setting}={value} ({first[:200]}); lower {setting} "
                       f"(e.g. {max(1, value // 2)}) — peak memory grows with it, not with the number of items"
                       ) from None
