"""A fork server for the ``epd`` CLI runs that the reliability suite kills and compares.

Starting a Python process that imports torch costs seconds on the CI machine; the kill tests need dozens of
runs. The server imports the CLI's modules once (networking disabled, see :mod:`offline`), checks that it is
still single-threaded (forking a multi-threaded process is unsafe), and then forks one child per run. Each
child is a real, separate process running ``epd.cli.main(argv)``: the test sends it a real ``SIGKILL`` at a
moment of its choosing, and the child has no chance to clean up. What a fresh interpreter would randomise is
randomised again in the child (Python's ``random``, NumPy's global RNG); the hash seed is the server's, so the
suite starts two servers with different ``PYTHONHASHSEED`` values and runs references and killed/resumed runs
on different ones. ``tests/reliability/test_determinism.py`` also compares against a plain
``python -m epd.cli`` process.

Protocol (one JSON object per line on stdin/stdout)::

    {"op": "run", "argv": [...], "stdout": PATH, "stderr": PATH, "cwd": DIR, "env": {...},
     "kill_at_replace": [N, "before"|"after"]}                -> {"pid": PID}
    {"op": "wait", "pid": PID}                                 -> {"exitcode": CODE}  (-9 after SIGKILL)
    {"op": "exit"}

``kill_at_replace`` makes the child ``SIGKILL`` itself just before (or after) its N-th ``os.replace``: the
commit point of every atomic write, where a torn output would show if one could.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PRELOAD = ("torch", "numpy", "PIL.Image", "PIL.PngImagePlugin", "safetensors.torch", "yaml", "jsonschema", "tqdm",
           "epd.cli", "epd.config", "epd.teacher", "epd.distill", "epd.sample", "epd.evaluate", "epd.rdpo.cli",
           "epd.rdpo.trainer", "epd.backbones.gmm", "epd.backbones.digits", "epd.backbones.digits.scorers",
           "epd.rewards", "epd.metrics.imagedir", "epd.metrics.stats")
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
             "TQDM_MININTERVAL": "0", "TQDM_MINITERS": "1",  # progress printed at every iteration
             "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", "MPLBACKEND": "Agg"}


# ---------------------------------------------------------------------------------------------- server side
def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _child(req: dict) -> None:
    import random
    import traceback

    rc = 1
    try:
        os.close(0)
        for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        os.chdir(req["cwd"])
        os.environ.update(req.get("env") or {})
        random.seed()  # a fresh interpreter would not share these states with its siblings
        import numpy as np

        np.random.seed()
        kill = req.get("kill_at_replace")
        if kill:
            _arm_kill(int(kill[0]), kill[1])
        if req["argv"] == ["--network-probe"]:  # not an epd command: shows the child inherited the socket patch
            import socket

            try:
                socket.create_connection(("192.0.2.1", 443), timeout=1)
                print("connected")
            except OSError as e:
                print(f"{type(e).__name__}: {e}")
            import offline

            offline.ATTEMPTS.clear()  # the probe's own, expected attempt
            rc = 0
        else:
            from epd.cli import main

            rc = main(list(req["argv"]))
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - report like an uncaught exception would
        traceback.print_exc()
        rc = 1
    finally:
        import offline

        if offline.ATTEMPTS:
            print(f"[offline] blocked network attempts: {offline.ATTEMPTS}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(rc or 0))


def _arm_kill(n: int, when: str) -> None:
    real = os.replace
    count = [0]

    def replace(src, dst, *a, **k):
        count[0] += 1
        if count[0] == n and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        out = real(src, dst, *a, **k)
        if count[0] == n and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    os.replace = replace


def serve() -> None:
    sys.path.insert(0, str(HERE))
    import importlib

    import offline

    offline.install()
    for name in PRELOAD:
        importlib.import_module(name)
    reply = sys.stdout
    print(json.dumps({"ready": True, "pid": os.getpid(), "threads": _threads()}), file=reply, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "run":
            if _threads() != 1:
                print(json.dumps({"error": f"server has {_threads()} threads; refusing to fork"}), file=reply,
                      flush=True)
                continue
            pid = os.fork()
            if pid == 0:
                _child(req)
            print(json.dumps({"pid": pid}), file=reply, flush=True)
        elif req["op"] == "wait":
            _, status = os.waitpid(int(req["pid"]), 0)
            print(json.dumps({"exitcode": os.waitstatus_to_exitcode(status)}), file=reply, flush=True)
        elif req["op"] == "exit":
            break


# ---------------------------------------------------------------------------------------------- client side
class ForkServer:
    """Client: start a server process; run, kill and reap CLI children through it.

    Args:
        log (`Path`): file receiving the server's own stderr.
        hash_seed (`int`): ``PYTHONHASHSEED`` of the server and hence of its children.
    """

    def __init__(self, log: Path, hash_seed: int):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "TQDM_"))}
        env.update(CHILD_ENV, PYTHONHASHSEED=str(hash_seed), PYTHONUNBUFFERED="1")
        self._log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-u", __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, bufsize=1, env=env, cwd=str(HERE))
        self.hello: dict | None = None
        self.hash_seed = hash_seed

    def ready(self) -> dict:
        if self.hello is None:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"fork server died during start-up; see {self._log.name}")
            self.hello = json.loads(line)
        return self.hello

    def _ask(self, req: dict) -> dict:
        self.ready()
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server died; see {self._log.name}")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(out["error"])
        return out

    def start(self, argv: list[str], out: Path, cwd: Path, kill_at_replace=None, env=None) -> "Child":
        """Fork a child running ``epd <argv>``; its stdout/stderr go to ``out.stdout``/``out.stderr``."""
        so, se = out.with_suffix(".stdout"), out.with_suffix(".stderr")
        pid = self._ask({"op": "run", "argv": [str(a) for a in argv], "stdout": str(so), "stderr": str(se),
                         "cwd": str(cwd), "env": env or {}, "kill_at_replace": kill_at_replace})["pid"]
        return Child(self, pid, so, se, time.monotonic())

    def wait(self, pid: int) -> int:
        return self._ask({"op": "wait", "pid": pid})["exitcode"]

    def run(self, argv, out: Path, cwd: Path, **kw) -> "Child":
        """Run to completion."""
        c = self.start(argv, out, cwd, **kw)
        c.wait()
        return c

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self._log.close()


class Child:
    """One CLI run forked by the server."""

    def __init__(self, server: ForkServer, pid: int, stdout: Path, stderr: Path, t0: float):
        self.server, self.pid, self.stdout, self.stderr, self.t0 = server, pid, stdout, stderr, t0
        self.exitcode: int | None = None
        self.seconds: float | None = None

    def alive(self) -> bool:
        """Running (not yet exited). An exited child stays a zombie until :meth:`wait` reaps it."""
        if self.exitcode is not None:
            return False
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")

    def kill(self) -> int:
        os.kill(self.pid, signal.SIGKILL)
        return self.wait()

    def wait(self) -> int:
        if self.exitcode is None:
            self.exitcode = self.server.wait(self.pid)
            self.seconds = time.monotonic() - self.t0
            assert "[offline] blocked network attempts" not in self.err(), f"a CLI run tried the network:\n{self.err()}"
        return self.exitcode

    def err(self) -> str:
        return self.stderr.read_text(errors="replace") if self.stderr.exists() else ""

    def out(self) -> str:
        return self.stdout.read_text(errors="replace") if self.stdout.exists() else ""


if __name__ == "__main__":
    serve()
