"""Offline guarantee. The whole reliability package runs with networking disabled (``conftest.no_network``: every
IPv4/IPv6 connect and name lookup raises, and any attempt fails the package even if the caller swallowed the
error); so do all CLI runs of the suite (the fork server installs the same patch before forking). A static check
makes sure no module of ``epd`` calls a download API."""

from __future__ import annotations

import ast
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from . import offline

EPD = Path(__file__).resolve().parents[2] / "epd"


def test_network_is_disabled_in_this_process():
    n = len(offline.ATTEMPTS)
    with pytest.raises(offline.NetworkDisabled):
        socket.create_connection(("192.0.2.1", 443), timeout=1)
    with pytest.raises(urllib.error.URLError, match="networking is disabled"):
        urllib.request.urlopen("https://huggingface.co/api/models", timeout=1)
    with pytest.raises(offline.NetworkDisabled):
        socket.getaddrinfo("huggingface.co", 443)
    assert len(offline.ATTEMPTS) == n + 3
    del offline.ATTEMPTS[n:]  # expected attempts; the package teardown fails on any other
    a, b = socket.socketpair()  # local IPC and loopback still work
    a.sendall(b"x")
    assert b.recv(1) == b"x"
    a.close()
    b.close()
    srv = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(srv.getsockname(), timeout=5)
    c.close()
    srv.close()
    assert len(offline.ATTEMPTS) == n


def test_cli_children_are_offline(servers, tmp_path):
    for name, server in servers.items():
        child = server.run(["--network-probe"], tmp_path / name, tmp_path)
        assert child.exitcode == 0
        assert "NetworkDisabled: network access attempted" in child.out(), child.out()


def test_workflow_commands_run_offline(ws, refs, tmp_path):
    """The smoke workflow's command chain on small inputs, with MLflow tracking on as in the workflow, in a fresh
    interpreter whose environment looks like a user's shell (no CI variables): config validation, teacher,
    distillation, snapshot display, sampling, evaluation. Every network attempt, even one a library swallows
    (MLflow's telemetry does), is reported by the offline patch when the process exits."""
    cfg = yaml.safe_load(ws.config.read_text())
    cfg["backbones"]["g"]["teacher"].update(seeds="0-63", batch=32, M=3)
    cfg["backbones"]["g"]["distill"].update(iterations=4, batch=16, save_every=2)
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump(cfg))
    steps = [
        ["validate-config", small],
        ["teacher", "--config", small, "--backbone", "g", "--nfe", "5", "--out", tmp_path / "t"],
        ["distill", "--config", small, "--backbone", "g", "--nfe", "5", "--teacher", tmp_path / "t", "--out",
         tmp_path / "d"],
        ["predictor", "show", tmp_path / "d" / "table.safetensors"],
        ["sample", "--config", small, "--backbone", "d", "--weights", ws.digits, "--predictor_path", ws.init_table,
         "--seeds", "0-9", "--outdir", tmp_path / "s", "--save-latents"],
        ["evaluate", "--images", tmp_path / "s", "--metrics", "digits_alignment", "digits_fd", "--weights-dir",
         ws.digits, "--out-dir", tmp_path / "e", "--device", "cpu"],
        ["metrics", "list"],
    ]
    driver = ("import json, sys\nfrom epd.cli import main\nfor argv in json.loads(sys.argv[1]):\n"
              " rc = main(argv)\n assert rc == 0, (argv, rc)\n")
    ci = ("CI", "PYTEST_CURRENT_TEST", "GITHUB_ACTIONS", "GITLAB_CI", "JENKINS_URL", "BUILDKITE", "TF_BUILD", "TRAVIS",
          "CIRCLECI", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    env = {k: v for k, v in os.environ.items() if k not in ci}
    env.update(PYTHONPATH=str(Path(__file__).parent / "nonet"), OMP_NUM_THREADS="1",
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    r = subprocess.run([sys.executable, "-c", driver, json.dumps([[str(a) for a in s] for s in steps])], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[offline] blocked network attempts" not in r.stderr, r.stderr[-3000:]
    assert json.loads((tmp_path / "e" / "summary.json").read_text())["num_images"] == 10
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")  # no global MLflow state is changed
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.data.tags["stage"] for r in runs) == ["distill", "evaluate", "sample", "teacher"]


# ---------------------------------------------------------------------------------------------- static check
FORBIDDEN_CALLS = {  # name -> why it is not allowed
    "hf_hub_download": "downloads from the Hugging Face hub",
    "snapshot_download": "downloads from the Hugging Face hub",
    "cached_download": "downloads from the Hugging Face hub",
    "urlopen": "opens a URL",
    "urlretrieve": "downloads a URL",
    "load_state_dict_from_url": "torch.hub download",
    "download_url_to_file": "torch.hub download",
}
FORBIDDEN_MODULES = ("requests", "urllib.request", "http.client", "httpx", "aiohttp", "ftplib", "socket", "wget",
                     "torch.hub", "hpsv2", "huggingface_hub")
# ``X.from_pretrained(...)`` calls without local_files_only=True that are allowed, and why.
FROM_PRETRAINED_ALLOWED = {
    "SD15Backbone.from_pretrained": "epd's own constructor; it resolves a local folder and calls diffusers with "
                                    "local_files_only=True (checked by this same test)",
    "SD3Backbone.from_pretrained": "epd's own constructor (as above)",
    "FluxBackbone.from_pretrained": "epd's own constructor (as above)",
    "cls.from_pretrained": "DiffusersBackbone.from_section calling the adapter's own constructor (as above)",
}


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    rel = path.relative_to(EPD.parent)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [f"{rel}:{node.lineno}: imports {a.name}" for a in node.names
                    if a.name.startswith(FORBIDDEN_MODULES)]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith(FORBIDDEN_MODULES):
                out.append(f"{rel}:{node.lineno}: imports from {node.module}")
            out += [f"{rel}:{node.lineno}: imports {a.name} ({FORBIDDEN_CALLS[a.name]})" for a in node.names
                    if a.name in FORBIDDEN_CALLS]
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            last = name.rsplit(".", 1)[-1]
            kw = {k.arg: k.value for k in node.keywords}
            if last in FORBIDDEN_CALLS:
                out.append(f"{rel}:{node.lineno}: calls {name} ({FORBIDDEN_CALLS[last]})")
            if name.startswith("sklearn.datasets.fetch_") or last.startswith("fetch_"):
                out.append(f"{rel}:{node.lineno}: calls {name} (downloads a data set)")
            if name in ("clip.load", "ImageReward.load", "RM.load") or name.startswith("torch.hub."):
                out.append(f"{rel}:{node.lineno}: calls {name} (downloads weights by name)")
            if last == "from_pretrained" and name not in FROM_PRETRAINED_ALLOWED:
                v = kw.get("local_files_only")
                if not (isinstance(v, ast.Constant) and v.value is True):
                    out.append(f"{rel}:{node.lineno}: {name}(...) without local_files_only=True")
            if last.startswith("create_model") and "pretrained" in kw:
                v = kw["pretrained"]
                if not (isinstance(v, ast.Constant) and v.value is None):
                    out.append(f"{rel}:{node.lineno}: {name}(pretrained=...) may download")
    return out


# The one module allowed to reach the network: `epd assets fetch`, a download the user asks for (checksummed,
# pinned to a commit, with --mirror for offline machines). Nothing else may import it.
EXPLICIT_DOWNLOAD = EPD / "assets.py"


def test_only_the_assets_command_imports_the_downloader():
    importers = [f for f in EPD.rglob("*.py") if f != EXPLICIT_DOWNLOAD
                 and any(isinstance(n, ast.ImportFrom) and (n.module or "").endswith("assets")
                         or isinstance(n, ast.Import) and any(a.name.endswith("assets") for a in n.names)
                         for n in ast.walk(ast.parse(f.read_text())))]
    assert not importers
    assert _violations(EXPLICIT_DOWNLOAD)  # the scan does see its URL calls: they are allowed, not invisible


def test_no_module_calls_a_download_api():
    files = sorted(f for f in EPD.rglob("*.py") if f != EXPLICIT_DOWNLOAD)
    assert len(files) > 40
    problems = [v for f in files for v in _violations(f)]
    assert not problems, "\n".join(problems)
    calls = sum(1 for f in files for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, ast.Call)
                and _dotted(n.func).endswith("from_pretrained"))
    assert calls >= 6  # the check looked at the real loaders (diffusers, transformers, tokenizers)


def test_static_check_catches_what_it_should(tmp_path):
    """Control: each forbidden pattern is reported."""
    bad = tmp_path / "epd" / "bad.py"
    bad.parent.mkdir()
    bad.write_text("import requests\nfrom huggingface_hub import hf_hub_download\nimport torch\n"
                   "torch.hub.load('a', 'b')\nCLIPModel.from_pretrained('openai/clip')\n"
                   "AutoTokenizer.from_pretrained(p, local_files_only=False)\n"
                   "open_clip.create_model_and_transforms('ViT-H-14', pretrained='laion2b')\n"
                   "clip.load('ViT-L/14')\nsklearn.datasets.fetch_openml('mnist')\n")
    global EPD
    saved, EPD = EPD, tmp_path / "epd"
    try:
        found = _violations(bad)
    finally:
        EPD = saved
    assert len(found) == 9, found
