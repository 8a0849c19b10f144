"""The workflow in a project folder: a real-backbone study plans once the original's released files are fetched
(and stops before any job, naming the command, when one is missing); two studies keep their own bookkeeping."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import build_mirror  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def project(tmp_path):
    root = tmp_path / "proj"
    root.mkdir()
    for item in ("Snakefile", "workflow", "configs"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / item)
    return root


def _run(root, *args):
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = "/usr/bin:/bin"  # as `.venv/bin/snakemake` without activation: no epd on PATH
    return subprocess.run([str(BIN / "snakemake"), *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


def test_real_study_plans_after_fetch_and_stops_without_an_asset(project, tmp_path):
    mirror = build_mirror(tmp_path / "mirror")
    r = subprocess.run([str(BIN / "epd"), "assets", "fetch", "--mirror", str(mirror)], cwd=project,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = _run(project, "-n", "--configfile", "configs/sd15.yaml")
    assert r.returncode == 0, r.stdout + r.stderr
    for rule in ("backbone_check", "teacher", "distill", "rdpo", "sample", "evaluate", "report"):
        assert f"\n{rule} " in r.stdout or f"rule {rule}:" in r.stdout, rule
    (project / "data/original/src/prompts/test.txt").unlink()
    r = _run(project, "-n", "--configfile", "configs/sd15.yaml")
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "backbones.sd15.prompts.eval: data/original/src/prompts/test.txt not found" in out
    assert "epd assets fetch" in out and "Traceback" not in out


def test_two_studies_keep_their_own_bookkeeping(project):
    r = _run(project, "-n", "--configfile", "configs/smoke.yaml")
    assert r.returncode == 0, r.stdout + r.stderr
    smoke = project / "results/studies/smoke/config.yaml"
    before = smoke.read_bytes(), smoke.stat().st_mtime_ns
    r = _run(project, "-n", "--configfile", "configs/sd15.yaml")  # no assets here: stops, touching nothing
    assert r.returncode != 0
    r = _run(project, "-n", "--configfile", "configs/default.yaml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (smoke.read_bytes(), smoke.stat().st_mtime_ns) == before
    assert sorted(p.name for p in (project / "results/studies").iterdir()) == ["default", "smoke"]
    assert not (project / "results/config.yaml").exists() and not (project / "results/expected_rows.json").exists()
