"""Same config and seeds on CPU: byte-identical samples and identical metrics, twice in a row (two processes
with different hash seeds), in a fresh ``python -m epd.cli`` interpreter, and across a resume (the kill tests
compare the resumed outputs with the same references)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .harness import STAGES, canon, diff


def _images(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("[0-9]*.png")) + sorted(d.glob("[0-9]*.json"))}


def test_sample_twice_in_a_row_is_byte_identical(ws, servers, refs, tmp_path):
    ref = refs("sample")  # on the "ref" server (hash seed 11)
    again = tmp_path / "again"
    child = servers["kill"].run(STAGES["sample"].argv(ws, again, {}), tmp_path / "run", ws.root)  # hash seed 22
    assert child.exitcode == 0, child.err()[-2000:]
    a, b = _images(ref), _images(again)
    assert len(a) == 2 * 160 and a.keys() == b.keys()
    assert [n for n in a if a[n] != b[n]] == []
    assert diff(canon(ref), canon(again)) == []  # summary.json too (wall-clock seconds aside)
    assert len(set(a.values())) == len(a), "distinct seeds must give distinct images (the check would be vacuous)"


def test_sample_in_a_fresh_interpreter_is_byte_identical(ws, refs, tmp_path):
    out = tmp_path / "fresh"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "random",
           "PYTHONPATH": str(Path(__file__).parent / "nonet")}
    env.pop("MLFLOW_TRACKING_URI", None)
    argv = [str(a) for a in STAGES["sample"].argv(ws, out, {})]
    r = subprocess.run([sys.executable, "-m", "epd.cli", *argv], env=env, cwd=ws.root, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[offline] blocked network attempts" not in r.stderr, r.stderr[-2000:]
    a, b = _images(refs("sample")), _images(out)
    assert a.keys() == b.keys() and [n for n in a if a[n] != b[n]] == []


def test_evaluate_twice_in_a_row_gives_identical_metrics(ws, servers, refs, tmp_path):
    ref = refs("evaluate")
    again = tmp_path / "again"
    child = servers["kill"].run(STAGES["evaluate"].argv(ws, again, {"sample": refs("sample")}), tmp_path / "run",
                                ws.root)
    assert child.exitcode == 0, child.err()[-2000:]
    assert (ref / "scores.csv").read_bytes() == (again / "scores.csv").read_bytes()
    s1, s2 = (json.loads((d / "summary.json").read_text())["metrics"] for d in (ref, again))
    assert s1 == s2 and set(s1) == {"digits_alignment", "digits_accuracy", "digits_realism"}
    assert diff(canon(ref), canon(again)) == []
    rows = (ref / "scores.csv").read_text().splitlines()
    assert len(rows) == 161 and len({r.split(",")[-3] for r in rows[1:]}) > 10  # real, varying per-image scores
