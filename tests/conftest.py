"""Shared pytest fixtures."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import SHARED  # noqa: E402


@pytest.fixture
def float64_default():
    """Run a test with float64 as torch's default dtype, restoring the previous default afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one torch thread is faster and immune to a busy machine's thread contention (module-wide)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Where ``../shared`` exists, a test skipped for want of its fixtures is a failure (see tests/_shared.py)."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and isinstance(report.longrepr, tuple) and SHARED.is_dir():
        reason = str(report.longrepr[2])
        if "needs ../shared/" in reason:
            report.outcome = "failed"
            report.longrepr = f"{reason}\n../shared exists here, so its fixtures must be complete: this test may not skip"
