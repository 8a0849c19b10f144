"""`epd rdpo-export` takes the original exporter's flags (`--device`, `--no-manifest`, `--output-dir`): the same
snapshot and options files as a plain export, and no manifest with `--no-manifest`."""

import sys
from pathlib import Path

import pytest

from epd.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import FIXTURES, needs  # noqa: E402

RUNS = sorted(FIXTURES.glob("rlepd/smoke/*/runs/*smoke_sd15/"))
pytestmark = needs("rlepd/smoke")


@pytest.fixture(scope="module")
def run_dir():
    assert RUNS, "no smoke_sd15 run among the fixtures"
    return RUNS[0]


def test_original_flags_give_the_same_files_without_manifest(run_dir, tmp_path, capsys):
    assert main(["rdpo-export", str(run_dir), "--output-dir", str(tmp_path / "plain")]) == 0
    assert "manifest: " in capsys.readouterr().out
    assert main(["rdpo-export", str(run_dir), "--output-dir", str(tmp_path / "orig"), "--device", "cpu",
                 "--no-manifest"]) == 0
    assert "manifest: " not in capsys.readouterr().out
    plain = {p.name: p.read_bytes() for p in (tmp_path / "plain").iterdir()}
    orig = {p.name: p.read_bytes() for p in (tmp_path / "orig").iterdir()}
    manifest = [n for n in plain if n.startswith("export-manifest-step")]
    assert len(manifest) == 1 and set(orig) == set(plain) - set(manifest)
    assert all(orig[n] == plain[n] for n in orig)


def test_device_other_than_cpu_is_accepted(run_dir, tmp_path):
    assert main(["rdpo-export", str(run_dir), "--out", str(tmp_path / "a"), "--device", "cuda"]) == 0
    assert main(["rdpo-export", str(run_dir), "--out", str(tmp_path / "b")]) == 0
    a, b = sorted((tmp_path / "a").glob("network-*")), sorted((tmp_path / "b").glob("network-*"))
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b] and len(a) == 2
