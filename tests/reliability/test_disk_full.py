"""A full disk while sampling or checkpointing: the job stops with an error that says the disk is full and names
the file, files written before are intact (the previous checkpoint still loads and is unchanged), no temporary
file is left behind, and after space is freed the rerun resumes and ends with the uninterrupted run's outputs.

Two ways: ``ENOSPC`` injected at ``fsync`` of one chosen file (the point where delayed-allocation file systems
and NFS report it; always runs), and a real, tiny tmpfs mounted in a private mount namespace (``unshare -m``;
skipped where mounting is not permitted).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from epd.cli import main as cli_main

from .harness import STAGES, canon, check_complete, diff, hidden_files


def _fail_fsync_of(monkeypatch, match) -> list[str]:
    """Make ``fsync`` raise ENOSPC for files whose name satisfies ``match(name, nth)``; returns the names hit."""
    real, hits, seen = os.fsync, [], {}

    def fsync(fd):
        name = Path(os.readlink(f"/proc/self/fd/{fd}")).name
        key = name.split(".")[1] if name.startswith(".") else name  # temp files are named .<final name>.XXXX
        seen[key] = seen.get(key, 0) + 1
        if match(name, seen[key]):
            hits.append(name)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return hits


def test_disk_full_while_sampling(ws, refs, tmp_path, monkeypatch, capsys):
    ref = refs("sample")
    out = tmp_path / "out"
    argv = [str(a) for a in STAGES["sample"].argv(ws, out, {})]
    argv[argv.index("--seeds") + 1] = "0-15"
    hits = _fail_fsync_of(monkeypatch, lambda name, n: name.startswith(".000009.png."))
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert hits and "000009.png: disk full while writing (No space left on device)" in err, err
    assert "no 000009.png was written" in err and "rerun" in err, err
    assert not hidden_files(out), "temporary files left behind"
    assert not check_complete(out)
    done = sorted(p.name for p in out.glob("*.png"))
    assert done == [f"{i:06d}.png" for i in range(9)]
    for name in done:  # what was written before is intact
        assert (out / name).read_bytes() == (ref / name).read_bytes()
    monkeypatch.undo()
    assert cli_main(argv) == 0
    for i in range(16):
        for ext in (".png", ".json"):
            assert (out / f"{i:06d}{ext}").read_bytes() == (ref / f"{i:06d}{ext}").read_bytes()


def test_disk_full_while_checkpointing(ws, refs, tmp_path, monkeypatch, capsys):
    ref = refs("distill")
    out = tmp_path / "out"
    argv = [str(a) for a in STAGES["distill"].argv(ws, out, {"teacher": refs("teacher")})]
    hits = _fail_fsync_of(monkeypatch, lambda name, n: name.startswith(".checkpoint.pt.") and n == 3)
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert hits and "checkpoint.pt: disk full while writing" in err and "the previous checkpoint.pt is intact" in err
    assert not hidden_files(out)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["iteration"] == 20  # the third save (iteration 30) failed; the second is what remains
    assert not (out / "table.safetensors").exists()
    monkeypatch.undo()
    assert cli_main(argv) == 0
    assert diff(canon(out), canon(ref)) == []


DRIVER = r"""
import contextlib, io, json, os, shutil, subprocess, sys
sys.path.insert(0, sys.argv[1])
import offline
offline.install()
from epd.cli import main
job = json.loads(sys.argv[2])
mnt, page = job["mount"], os.sysconf("SC_PAGE_SIZE")

def run(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, err.getvalue()

subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={job['pages'] * page}", "tmpfs", mnt], check=True)
res = {}
res["rc1"], res["err1"] = run(job["argv"])
shutil.copytree(mnt, job["snap1"])
subprocess.run(["mount", "-o", "remount,size=64m", mnt], check=True)
res["rc2"], res["err2"] = run(job["argv"])
shutil.copytree(mnt, job["snap2"])
print(json.dumps(res))
"""


def _unshare_available() -> bool:
    if not shutil.which("unshare") or not shutil.which("mount"):
        return False
    r = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"], capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not _unshare_available(), reason="mounting a tmpfs in a private mount namespace is not permitted")
@pytest.mark.parametrize("stage,pages", [("sample", 12), ("distill", 6)])
def test_real_full_tmpfs(stage, pages, ws, refs, tmp_path):
    """``pages`` of 4 KiB: sample fills it after about six images (PNG + sidecar, a page each); distillation can
    keep one ~11 KB checkpoint and write the next beside it until the checkpoint outgrows three pages."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    argv = [str(a) for a in STAGES[stage].argv(ws, mnt, {d: refs(d) for d in STAGES[stage].needs})]
    job = {"mount": str(mnt), "pages": pages, "argv": argv, "snap1": str(tmp_path / "snap1"),
           "snap2": str(tmp_path / "snap2")}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    r = subprocess.run(["unshare", "-m", sys.executable, "-c", DRIVER, str(Path(__file__).parent), json.dumps(job)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["rc1"] == 2, res["err1"][-2000:]
    err = res["err1"]
    assert "disk full while writing (No space left on device)" in err and str(mnt) in err, err
    snap1, snap2, ref = tmp_path / "snap1", tmp_path / "snap2", refs(stage)
    assert not hidden_files(snap1), f"temporary files left behind: {hidden_files(snap1)}"
    assert not check_complete(snap1)
    ref_files = canon(ref)
    partial = canon(snap1)
    if stage == "sample":
        assert 0 < len(list(snap1.glob("*.png"))) < 20
        assert all(partial[n] == ref_files[n] for n in partial), "an image written before the disk filled changed"
    else:
        it = torch.load(snap1 / "checkpoint.pt", weights_only=True)["iteration"]
        assert 0 < it < 60 and "the previous checkpoint.pt is intact" in err, err
    assert res["rc2"] == 0, res["err2"][-2000:]
    assert diff(canon(snap2), ref_files) == [] and canon(snap2).keys() == ref_files.keys()
