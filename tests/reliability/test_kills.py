"""SIGKILL at random points of every long stage; the rerun finishes with outputs identical to an uninterrupted run.

For teacher generation, distillation, RDPO and sampling one output folder goes through a chain of runs: five are
killed at random moments (a seeded RNG picks a progress target and a delay after it), two more are killed at
the commit point of an atomic write (just before / just after the N-th ``os.replace``), and a last run
completes. After every kill:

* every file under its final name parses completely (no truncated file is ever visible);
* the work lost is less than one save interval: what is on disk (shards, images, checkpoint step) is at least
  the progress the killed process had reported minus the save interval;
* the next run continues from there (its progress bar starts at the checkpoint; finished shards and images are
  never rewritten).

After the last run no temporary file of a killed writer is left (each is removed when its target is written
again). The completed folder must equal the reference, which was produced without interruption by another process
with another hash seed: tensors, images and CSV byte for byte, JSON equal except wall-clock fields.

``epd evaluate`` writes its outputs only after scoring everything (its save interval is the whole run): it is
killed at random moments and at each of its output writes; whatever is visible after a kill must equal the
reference's file, and the rerun must produce the reference.
"""

from __future__ import annotations

import os
import random
import time

import pytest

from .harness import STAGES, canon, check_complete, diff, finished_images, hidden_files, resume_point, tqdm_counts

RANDOM_KILLS = 5
TIMEOUT = 120.0


def _targets(rng: random.Random, start: int, total: int, n: int, step: int = 1) -> list[int]:
    """``n`` increasing progress targets after ``start`` and inside the first 80% of the run, two units apart."""
    lo, hi = -(-(start + 2 * step) // step) * step, int(total * 0.8)
    assert len(range(lo, hi + 1, step)) >= 2 * n, f"too little work left for {n} kills after {start}"
    while True:
        t = sorted(rng.sample(range(lo, hi + 1, step), n))
        if all(b - a >= 2 * step for a, b in zip(t, t[1:])):
            return t


def _progress(stage: str, child, out, start: int) -> int:
    counts = tqdm_counts(child.err())
    if stage == "sample":  # its bar counts the batches left at start; report images instead
        return start + 8 * (max(counts) if counts else 0)
    return max(counts) if counts else 0


def _run_until(stage, child, out, target, start):
    t0 = time.monotonic()
    while _progress(stage, child, out, start) < target:
        if not child.alive():
            pytest.fail(f"{stage} ended (exit {child.wait()}) before reaching progress {target}:\n"
                        f"{child.err()[-2000:]}")
        if time.monotonic() - t0 > TIMEOUT:
            child.kill()
            pytest.fail(f"{stage}: no progress to {target} within {TIMEOUT} s")
        time.sleep(0.004)


def _stamps(out, stage):
    """(inode, mtime) of the finished units a rerun must not redo."""
    if stage == "teacher":
        done = list(out.glob("shard-*.safetensors"))
    elif stage == "sample":  # an image counts as finished once its sidecar is written
        done = [p for p in out.glob("[0-9]*.png") if p.with_suffix(".json").exists()]
    else:
        return {}
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in done}


class Chain:
    """One output folder driven through killed runs; checks after every kill."""

    def __init__(self, stage, ws, servers, refs, tmp_path):
        self.stage, self.st, self.ws, self.server, self.tmp = stage, STAGES[stage], ws, servers["kill"], tmp_path
        self.out = tmp_path / "out"
        self.argv = self.st.argv(ws, self.out, {d: refs(d) for d in self.st.needs})
        self.step = 8 if stage == "sample" else 1  # progress unit of the sample stage: images, in batches of 8
        self.kills, self.stamps = [], {}

    def kill(self, how: str, target: int, rng: random.Random) -> None:
        i, stage, out = len(self.kills), self.stage, self.out
        start = resume_point(stage, out)
        if how == "random":
            child = self.server.start(self.argv, self.tmp / f"kill{i}", self.ws.root)
            _run_until(stage, child, out, target, start)
            time.sleep(rng.uniform(0.0, 0.06))
            code = child.kill()
        else:  # at the commit point of the target-th atomic write of this run
            child = self.server.run(self.argv, self.tmp / f"kill{i}", self.ws.root,
                                    kill_at_replace=[target, how.split("-")[0]])
            code = child.exitcode
        assert code == -9, f"kill {i} ({how} {target}) did not hit a running {stage} (exit {code}):\n" \
                           f"{child.err()[-2000:]}"
        problems = check_complete(out)
        assert not problems, f"after kill {i} ({how}), files under their final names are incomplete: {problems}"
        rp = resume_point(stage, out)
        seen = _progress(stage, child, out, start)
        assert rp >= seen - self.st.save_interval * self.step + self.step, (
            f"kill {i}: the killed {stage} had reported {seen} but only {rp} survive (save interval "
            f"{self.st.save_interval})")
        first = tqdm_counts(child.err())
        if stage in ("distill", "rdpo") and first:  # (a run killed before its progress bar appeared shows none)
            assert first[0] == start, f"run {i} did not resume from {start}: progress began at {first[0]}"
        self.check_unchanged(f"after kill {i}")
        self.stamps = _stamps(out, stage)
        self.kills.append((how, target, seen, rp))
        if os.environ.get("EPD_RELIABILITY_VERBOSE"):
            print(f"\n{stage} kill {i}: {how} {target}: progress reported {seen}, on disk {rp}, "
                  f"{len(hidden_files(out))} temporary files left")

    def check_unchanged(self, when: str) -> None:
        now = _stamps(self.out, self.stage)
        for name, s in self.stamps.items():
            assert now.get(name) == s, f"{name} was rewritten {when} although it was finished"


@pytest.mark.parametrize("stage", ["teacher", "distill", "rdpo", "sample"])
def test_killed_and_resumed_run_equals_uninterrupted(stage, ws, servers, refs, tmp_path):
    ch = Chain(stage, ws, servers, refs, tmp_path)
    rng = random.Random(f"epd-reliability-kill-{stage}")
    writes = (1, 2) if stage == "distill" else (2, 3)  # distillation commits a checkpoint every 10 iterations
    ch.kill("before-replace", rng.randint(*writes), rng)  # a complete temporary file, not yet renamed
    ch.kill("after-replace", rng.randint(*writes), rng)  # right after a rename
    for t in _targets(rng, resume_point(stage, ch.out), ch.st.total, RANDOM_KILLS, ch.step):
        ch.kill("random", t, rng)
    final = ch.server.run(ch.argv, tmp_path / "final", ws.root)
    assert final.exitcode == 0, final.err()[-3000:]
    if stage in ("distill", "rdpo"):
        assert tqdm_counts(final.err())[0] == ch.kills[-1][3], "the final run did not resume from the last checkpoint"
    ch.check_unchanged("by the final run")
    assert not check_complete(ch.out)
    assert sum(k[0] == "random" and k[2] >= k[1] for k in ch.kills) == RANDOM_KILLS, f"kill points: {ch.kills}"
    assert not hidden_files(ch.out), f"temporary files of killed writers were left: {hidden_files(ch.out)}"
    a, b = canon(ch.out), canon(refs(stage))
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    assert diff(a, b) == [], f"{stage}: resumed outputs differ from the uninterrupted run in {diff(a, b)}"
    if stage == "sample":
        assert finished_images(ch.out) == ch.st.total


def test_killed_evaluation_leaves_only_complete_reference_files(ws, servers, refs, tmp_path):
    st = STAGES["evaluate"]
    ref = canon(refs("evaluate"))
    out = tmp_path / "out"
    argv = st.argv(ws, out, {"sample": refs("sample")})
    rng = random.Random("epd-reliability-kill-evaluate")
    duration = ws.ref_seconds["evaluate"]
    hits, attempts = 0, 0
    while hits < RANDOM_KILLS:
        attempts += 1
        assert attempts <= 3 * RANDOM_KILLS, "evaluation always finished before the random kill time"
        child = servers["kill"].start(argv, tmp_path / f"kill{attempts}", ws.root)
        time.sleep(rng.uniform(0.1, 0.9) * duration)
        if child.kill() == -9:
            hits += 1
        _check_partial(out, ref)
    n_writes = len(ref)  # scores.csv, one JSON per metric, summary.json: one os.replace each
    for n in sorted({1, (n_writes + 1) // 2, n_writes}):
        child = servers["kill"].run(argv, tmp_path / f"write{n}", ws.root, kill_at_replace=[n, "before"])
        assert child.exitcode == -9, child.err()[-2000:]
        _check_partial(out, ref)
    final = servers["kill"].run(argv, tmp_path / "final", ws.root)
    assert final.exitcode == 0, final.err()[-3000:]
    assert diff(canon(out), ref) == [] and canon(out).keys() == ref.keys()
    assert not hidden_files(out), f"temporary files of killed writers were left: {hidden_files(out)}"


def _check_partial(out, ref):
    problems = check_complete(out) if out.exists() else []
    assert not problems, problems
    got = canon(out) if out.exists() else {}
    wrong = [n for n in got if got[n] != ref.get(n)]
    assert not wrong, f"after a kill these outputs differ from the reference: {wrong}"
