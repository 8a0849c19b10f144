"""The cluster path on a real SLURM: the smoke study through ``workflow/profiles/slurm`` with every job an ``sbatch``
job, its report's numbers equal to a local run's; an RDPO job preempted by ``scontrol requeue`` resumes to the table
of an uninterrupted run; the profile's GPU requests reach ``sbatch`` as the plugin submits them.

The first two need a running one-node SLURM (``scripts/slurm_start.sh``; ``.ci/run`` starts it): elsewhere they skip
naming the script, and under CI (``CI=true``) a SLURM that is not up fails them instead. The GPU test needs no SLURM
(stub ``sbatch``). Both smoke runs together take a few minutes on two cores.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
JOBCOMP = Path("/var/log/slurm/jobcomp.log")  # jobcomp/filetxt: slurmctld appends one line per finished job
# this test cluster's site settings: no accounting database behind sacct, and jobs of seconds, not hours
SITE = ["--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "5"]
SMOKE = ["--configfile", "configs/smoke.yaml"]
# the environment the workflow's shell prefix gives every job (workflow/rules/common.smk), for the sbatch script
JOB_ENV = {"OMP_NUM_THREADS": "1", "EPD_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _slurm_problem() -> str | None:
    """Why this machine's SLURM cannot run the tests' jobs, or None."""
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return "no sbatch/scontrol on PATH"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if "UP" not in ping.stdout:
        return "slurmctld does not answer `scontrol ping`"
    states = subprocess.run(["sinfo", "-h", "-p", "cpu", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if not any(s.startswith(("idle", "mixed", "alloc")) for s in states.stdout.split()):
        return f"partition cpu has no usable node (states: {states.stdout.split() or 'none'})"
    return None


@pytest.fixture(scope="module")
def slurm():
    problem = _slurm_problem()
    if problem:
        msg = f"needs a running SLURM ({problem}); start one with `bash scripts/slurm_start.sh` as root"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{msg}. .ci/run starts it, so under CI this is a failure, not a skip", pytrace=False)
        pytest.skip(msg)


def _project(root: Path) -> Path:
    """A project folder as a user has it: Snakefile, workflow, configs and the conda file the rules name (no results,
    no pulled checkpoints)."""
    root.mkdir(parents=True)
    for item in ("Snakefile", "workflow", "configs", "environment.yml"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / item)
    return root


def _env(path: str | None = None) -> dict:
    """This checkout's epd for Snakemake and its jobs (sbatch exports the environment), the hub offline."""
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(JOB_ENV, MPLBACKEND="Agg", DVC_NO_ANALYTICS="1")
    if path is not None:
        env["PATH"] = path
    return env


def _snakemake(root: Path, *args: str, path: str | None = None):
    return subprocess.Popen([str(BIN / "snakemake"), *args], cwd=root, env=_env(path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout: float) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-6000:]
    return out


@pytest.fixture(scope="module")
def smoke_runs(slurm, tmp_path_factory):
    """The smoke study twice from scratch, at once: locally (``--cores 2``) and through the SLURM profile.
    Returns (slurm project, its Snakemake output, local project, seconds both took)."""
    base = tmp_path_factory.mktemp("slurm_smoke")
    local, cluster = _project(base / "local"), _project(base / "cluster")
    t0 = time.time()
    local_run = _snakemake(local, "--cores", "2", *SMOKE)
    cluster_run = _snakemake(cluster, "--workflow-profile", "workflow/profiles/slurm", *SMOKE, *SITE)
    try:
        out = _finish(cluster_run, 2400)
        _finish(local_run, 1200)
    finally:
        for p in (local_run, cluster_run):
            if p.poll() is None:
                p.kill()
    return cluster, out, local, time.time() - t0


def _jobcomp() -> dict[str, dict[str, str]]:
    """slurmctld's record of finished jobs: JobId -> its fields (the last record of a requeued job wins)."""
    jobs = {}
    for line in JOBCOMP.read_text().splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if "JobId" in fields:
            jobs[fields["JobId"]] = fields
    return jobs


def _job_stats(out: str) -> dict[str, int]:
    """Snakemake's closing `Job stats` table: rule -> jobs."""
    table = out.split("Job stats:")[1].split("\n\n")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, flags=re.M)
            if m.group(1) != "total"}


def _without_timings(markdown: str) -> str:
    """The table with its wall-clock column (``s/img``: a timing of this run, not a result) blanked in every row."""
    lines, col = [], None
    for line in markdown.splitlines():
        cells = line.split("|")
        if not line.startswith("|"):
            col = None
        elif col is None and any(c.strip() == "s/img" for c in cells):
            col = next(i for i, c in enumerate(cells) if c.strip() == "s/img")
        if col is not None and len(cells) > col:
            cells[col] = " - "
        lines.append("|".join(cells))
    return "\n".join(lines)


def _numbers(root: Path) -> dict:
    """The report's table, what it is built from (each row's evaluation summary: metric statistics and sampler
    metadata; its folder names differ), and the distilled and RDPO tables' bytes."""
    out = {"table.md": _without_timings((root / "reports/digits/table.md").read_text())}
    for p in sorted((root / "results/digits/eval").glob("*/nfe*/summary.json")):
        summary = json.loads(p.read_text())
        out[str(p.relative_to(root))] = {k: summary[k] for k in ("metrics", "metadata")}
    for p in ("distill/nfe5/table", "rdpo/nfe5/table_best", "rdpo/nfe5/table_final"):
        out[p] = (root / f"results/digits/{p}.safetensors").read_bytes()
    return out


def test_smoke_study_through_slurm_matches_a_local_run(smoke_runs):
    cluster, out, local, seconds = smoke_runs
    print(f"smoke study, local and through SLURM at once: {seconds:.0f} s")
    subs = re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: \S*/slurm_logs/rule_(\w+)/", out)
    expected = {rule: n for rule, n in _job_stats(out).items() if rule != "all"}  # `all` only collects targets
    assert expected and Counter(rule for _, rule in subs) == expected, out[-4000:]
    # slurmctld's own record: each of those jobs ran to completion under this run's job name
    done = _jobcomp()
    assert all(done.get(jid, {}).get("JobState") == "COMPLETED" for jid, _ in subs), [done.get(j) for j, _ in subs]
    assert len({done[jid]["Name"] for jid, _ in subs}) == 1
    assert (cluster / "reports/README.md").stat().st_size > 0
    got, want = _numbers(cluster), _numbers(local)
    rows = json.loads((local / "results/studies/smoke/expected_rows.json").read_text())["digits"]
    # the table, one evaluation per study row, and the distilled and RDPO tables
    assert got.keys() == want.keys() and len(got) == 1 + len(rows) + 3, (sorted(got), rows)
    for key in want:
        assert got[key] == want[key], key


def _wait(what: str, cond, timeout: float, poll: float = 0.5):
    end = time.time() + timeout
    while time.time() < end:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def _job_state(jid: str) -> dict[str, str]:
    r = subprocess.run(["scontrol", "-o", "show", "job", jid], capture_output=True, text=True, timeout=30)
    return dict(f.split("=", 1) for f in r.stdout.split() if "=" in f)


def test_rdpo_requeued_mid_run_resumes_to_the_uninterrupted_table(smoke_runs, tmp_path):
    """`scontrol requeue` sends the running job SIGTERM and starts it again; the same `epd rdpo` command resumes in
    its run folder and ends with the table the smoke study's uninterrupted RDPO job wrote."""
    cluster = smoke_runs[0]
    run, starts = tmp_path / "rdpo", tmp_path / "starts"
    script = tmp_path / "rdpo.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"echo \"start ${{SLURM_RESTART_COUNT:-0}}\" >> {starts}\n"
        "trap 'echo batch shell: SIGTERM' TERM  # the shell outlives epd (which gets the signal too) to log its exit\n"
        f"{BIN}/epd rdpo --config results/studies/smoke/config.yaml --backbone digits "
        "--init results/digits/distill/nfe5/table.safetensors --weights results/digits/backbone --device cpu "
        f"--out {run}\n"
        f"echo \"exit $? ${{SLURM_RESTART_COUNT:-0}}\" >> {starts}\n")
    env = _env() | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    r = subprocess.run(["sbatch", "--parsable", "--requeue", "--open-mode=append", "-p", "cpu", "-c", "1",
                        "--mem", "4000", "-D", str(cluster), "-o", str(tmp_path / "job.log"), str(script)],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    jid = r.stdout.strip().split(";")[0]
    # mid-run: the first periodic checkpoint (step 2 of 4) is on disk and the run goes on
    _wait("the first RDPO checkpoint", lambda: list((run / "checkpoints").glob("policy-step*.pt")), 900)
    assert not (starts.exists() and "exit" in starts.read_text()), "the run ended before it could be preempted"
    r = subprocess.run(["scontrol", "requeue", jid], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    _wait("the requeued job to finish",
          lambda: _job_state(jid).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 900, 2)
    log = (tmp_path / "job.log").read_text()
    state = _job_state(jid)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", (state, log[-3000:])
    runs = starts.read_text().split()
    assert runs[:2] == ["start", "0"] and runs[-2:] == ["0", "1"], (starts.read_text(), log[-3000:])
    first_exit = runs[runs.index("exit") + 1]
    assert first_exit in ("143", "138"), (starts.read_text(), log[-3000:])  # stopped by the signal, not finished
    assert "resumed RDPO at step" in log, log[-3000:]
    want = cluster / "results/digits/rdpo/nfe5"
    for name in ("table_final.safetensors", "table_best.safetensors"):
        assert (run / name).read_bytes() == (want / name).read_bytes(), name


def test_gpu_requests_reach_sbatch(tmp_path):
    """A GPU study on a GPU partition: the profile's defaults and per-rule GPU counts as the executor hands them to
    sbatch (a stub records each call), and the sampler told to spread its work over the job's GPUs."""
    root = _project(tmp_path / "proj")
    cfg = yaml.safe_load((root / "configs/smoke.yaml").read_text())
    cfg["run"]["device"] = "cuda"
    sec = cfg["backbones"]["digits"]
    sec["metrics"] = [m for m in sec["metrics"] if m != "rmse_vs_teacher"]  # saved latents need one GPU
    (root / "configs/gpu.yaml").write_text(yaml.safe_dump(cfg))
    for p in ("backbone/model.safetensors", "backbone/classifier.safetensors", "distill/nfe5/table.safetensors"):
        (root / "results/digits" / p).parent.mkdir(parents=True, exist_ok=True)
        (root / "results/digits" / p).write_bytes(b"")  # present inputs: sample and rdpo jobs are the first wave
    profile = root / "workflow/profiles/slurm/config.yaml"  # a site's copy of the profile: its partition, 2-GPU sampling
    prof = yaml.safe_load(profile.read_text())
    prof["default-resources"]["slurm_partition"] = "gpu-h100"
    prof["set-resources"]["sample"] = {"gpu": 2}
    profile.write_text(yaml.safe_dump(prof))
    stub, calls = tmp_path / "bin", tmp_path / "calls"
    stub.mkdir(), calls.mkdir()
    for name, body in (("sbatch", f'printf "%s\\0" "$@" > {calls}/$$; echo "sbatch: stub" >&2; exit 1'),
                       ("squeue", "exit 0"), ("sacct", "exit 1")):
        (stub / name).write_text(f"#!/bin/sh\n{body}\n")
        (stub / name).chmod(0o755)
    targets = [f"results/digits/samples/{s}/nfe5/summary.json" for s in ("euler", "epd_distilled")]
    proc = _snakemake(root, "--workflow-profile", "workflow/profiles/slurm", "--configfile", "configs/gpu.yaml",
                      "--allowed-rules", "sample", "rdpo", "--retries", "0", "--keep-going", *SITE, "--",
                      *targets, "results/digits/rdpo/nfe5/table_best.safetensors", path=f"{stub}:/usr/bin:/bin")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "sbatch: stub" in out, out[-4000:]  # the submissions reached the stub
    submitted = {}
    for p in calls.iterdir():
        args = p.read_bytes().decode().rstrip("\0").split("\0")
        submitted[args[args.index("--comment") + 1]] = args
    assert sorted(submitted) == ["rule_rdpo_wildcards_digits_5", "rule_sample_wildcards_digits_epd_distilled_5",
                                 "rule_sample_wildcards_digits_euler_5"], submitted.keys()
    for comment, args in submitted.items():
        assert args[args.index("-p") + 1] == "gpu-h100" and args[args.index("--mem") + 1] == "8000", args
        assert [a for a in args if a.startswith("--gpus")] == ["--gpus=2" if "sample" in comment else "--gpus=1"]
    rdpo = submitted["rule_rdpo_wildcards_digits_5"]
    assert "--signal=USR1@600" in rdpo and rdpo[rdpo.index("-t") + 1] == "2880", rdpo
    # the sampler spreads over the job's two GPUs: an EPD table's K points, a baseline solver's seeds
    shell = [line for line in out.splitlines() if "epd sample" in line]
    assert any("--label epd_distilled" in s and "--gpus 2 --parallel points" in s for s in shell), shell
    assert any("--label euler" in s and "--gpus 2 --parallel seeds" in s for s in shell), shell
