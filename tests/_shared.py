"""The ``../shared`` folder beside the checkout: real files the original system wrote (test fixtures only).

A user's clone has no ``../shared``: a test that needs it skips with :data:`REASON`, naming the missing folder.
Where ``../shared`` does exist (CI, the developers' machines), ``conftest.py`` turns such a skip into a failure, so
a fixture that moved or a path that is wrong cannot hide behind a skip.
"""

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures"
REASON = "needs ../shared/fixtures/{} (test fixtures beside the checkout; a user's clone has none)"


def needs(*rels: str):
    """Mark a test (or a module, as ``pytestmark``) that reads ``FIXTURES/<rel>`` for each ``rel``."""
    missing = [r for r in rels if not (FIXTURES / r).exists()]
    return pytest.mark.skipif(bool(missing), reason=REASON.format(", ".join(missing)))


def fixture(rel: str) -> Path:
    """``FIXTURES/<rel>``, or skip the calling test naming it."""
    p = FIXTURES / rel
    if not p.exists():
        pytest.skip(REASON.format(rel))
    return p


# local fixture folder -> upstream repo-relative folder of the original repository (Ziyuli1121/RLEPD)
UPSTREAM_LAYOUT = {"best_models": "exps/best_models", "prompts": "src/prompts", "results": "results"}


def restore_upstream(data: bytes) -> bytes:
    """Upstream bytes of a fixture: its cluster paths were rewritten /work/nvme/ -> /data/nvme/ (same length)."""
    return data.replace(b"/data/nvme/", b"/work/nvme/")


def build_mirror(root: Path) -> Path:
    """A folder laid out like the upstream repository (what ``epd assets fetch --mirror`` takes), built from
    ``FIXTURES/rlepd`` with the upstream bytes restored; skips where the fixtures are absent."""
    rlepd = fixture("rlepd")
    for folder, upstream in UPSTREAM_LAYOUT.items():
        for src in (rlepd / folder).rglob("*"):
            if src.is_file():
                dst = root / upstream / src.relative_to(rlepd / folder)
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(restore_upstream(src.read_bytes()))
    return root
