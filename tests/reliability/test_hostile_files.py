"""Hostile and corrupt files, through every CLI path that reads one: refused with a message naming the file, exit 2,
no output written, and no payload ever runs (each payload would create a sentinel file; a control in a separate
process shows that the unsafe loader does create it).

The legacy ``.pkl`` payloads are the 14 crafted files of ``tests/test_legacy.py`` (whose liveness test shows the
stdlib unpickler runs them); here each one goes through ``predictor show``, ``predictor convert``,
``sample --predictor_path`` and ``rdpo --init``. Added here: torch zip checkpoints with pickle payloads and
storage tricks (distillation checkpoint, RDPO trainer state, policy checkpoint, reward weights), a YAML config
with a Python tag, an ``.npz`` with a pickled object array, and truncated/corrupt safetensors for native
snapshots, digits model/classifier/training checkpoints, teacher shards and latents.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from epd.cli import main as cli_main
from epd.errors import EPDError

from .harness import STAGES, TINY_DIGITS, visible_files

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_legacy import Call, G, Pid, _Asm, _payloads  # noqa: E402  (the 14 crafted legacy payloads)

LEGACY = list(_payloads(Path("/x")))


def _cli(argv, capsys) -> tuple[int, str]:
    rc = cli_main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def _refused(rc, err, path, sentinel, out=None, extra_ok=()):
    assert rc == 2, f"exit {rc}: {err[-2000:]}"
    assert "Traceback" not in err, err
    assert str(path) in err or Path(path).name in err, f"message does not name {path}: {err}"
    time.sleep(0.05)  # a payload that spawned a process would have created the sentinel by now
    assert not sentinel.exists(), "a payload ran"
    if out is not None and out.exists():
        left = [p for p in visible_files(out) if p.name not in extra_ok]
        assert not left, f"outputs were written: {left}"


# ---------------------------------------------------------------------------------------------- legacy pickles
LEGACY_PATHS = {
    "predictor show": lambda f, ws, out: ["predictor", "show", f],
    "predictor convert": lambda f, ws, out: ["predictor", "convert", f, f"{out}/"],
    "sample --predictor_path": lambda f, ws, out: ["sample", "--config", ws.config, "--backbone", "d", "--weights",
                                                   ws.digits, "--predictor_path", f, "--seeds", "0-1", "--outdir", out],
    "rdpo --init": lambda f, ws, out: ["rdpo", "--config", ws.config, "--backbone", "d", "--weights", ws.digits,
                                       "--init", f, "--out", out],
}


@pytest.mark.parametrize("payload", LEGACY)
def test_hostile_predictor_pickle_refused_by_every_cli_path(payload, ws, tmp_path, capsys):
    sentinel = tmp_path / "SENTINEL"
    data, _ = _payloads(sentinel)[payload]
    f = tmp_path / "network-snapshot-000001.pkl"
    f.write_bytes(data)
    for i, (name, argv) in enumerate(LEGACY_PATHS.items()):
        out = tmp_path / f"out{i}"
        rc, err = _cli(argv(f, ws, out), capsys)
        _refused(rc, err, f, sentinel, out)
        assert "refused" in err or "exactly one" in err, f"{name}: {err}"


# ---------------------------------------------------------------------------------------------- torch zip files
class _AsmGlobal(_Asm):
    """Like ``test_legacy.asm`` but writes globals with the GLOBAL opcode, as ``torch.save``'s protocol 2 does."""

    dispatch = _Asm.dispatch.copy()

    def _save_g(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

    dispatch[G] = _save_g


def _torch_zip(obj, records=None) -> bytes:
    """A ``torch.save``-layout zip whose ``data.pkl`` is the assembled ``obj``."""
    f = io.BytesIO()
    _AsmGlobal(f, 2).dump(obj)
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", f.getvalue())
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
        for k, v in (records or {}).items():
            z.writestr(f"archive/data/{k}", v)
    return b.getvalue()


class _Reduce:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _torch_save(obj) -> bytes:
    b = io.BytesIO()
    torch.save(obj, b)
    return b.getvalue()


def _tensor(size, numel=2):
    pid = Pid(("storage", G("torch", "FloatStorage"), "0", "cpu", numel))
    hooks = Call(G("collections", "OrderedDict"))
    return Call(G("torch._utils", "_rebuild_tensor_v2"), pid, 0, size, (1,), False, hooks)


def torch_payloads(sentinel: Path) -> dict[str, tuple[bytes, bool]]:
    """name -> (file bytes, whether ``torch.load(weights_only=False)`` would create the sentinel)."""
    s = str(sentinel)
    touch = f"touch '{s}'"
    write = f"open({s!r}, 'w').write('pwned')"
    data = {"0": struct.pack("<2f", 1.5, 2.5)}
    return {
        "os.system via __reduce__ (torch.save)": (_torch_save({"params": _Reduce(os.system, touch)}), True),
        "builtins.exec via __reduce__ (torch.save)": (_torch_save({"policy": _Reduce(exec, write)}), True),
        "builtins.eval inside a tensor list": (_torch_save([torch.zeros(2), _Reduce(eval, write)]), True),
        "getattr(__import__('os'), 'system') chain": (_torch_zip({"params": Call(Call(G("builtins", "getattr"), Call(
            G("builtins", "__import__"), "os"), "system"), touch)}), True),
        "os.system inside a storage persistent id": (_torch_zip({"params": Pid((
            "storage", G("torch", "FloatStorage"), "0", "cpu", Call(G("os", "system"), touch)))}, data), True),
        "tensor view 2^40 elements past a 2-element storage": (_torch_zip({"params": _tensor((1 << 40,))}, data),
                                                               False),
        "storage declaring 2^40 elements": (_torch_zip({"params": _tensor((2,), numel=1 << 40)}, data), False),
        "negative tensor size": (_torch_zip({"params": _tensor((-5,))}, data), False),
    }


TORCH = list(torch_payloads(Path("/x")))


def test_torch_payloads_are_live_under_unsafe_load(tmp_path):
    """Control: ``torch.load(weights_only=False)`` in a child process runs each code payload."""
    files = {}
    for i, name in enumerate(TORCH):
        blob, live = torch_payloads(tmp_path / f"SENTINEL-{i}")[name]
        if live:
            (tmp_path / f"p{i}.pt").write_bytes(blob)
            files[name] = (tmp_path / f"p{i}.pt", tmp_path / f"SENTINEL-{i}")
    subprocess.run([sys.executable, "-c", "import torch, sys\nfor f in sys.argv[1:]:\n try:\n  torch.load(f, "
                    "weights_only=False)\n except Exception:\n  pass", *[str(f) for f, _ in files.values()]],
                   timeout=120, capture_output=True)
    assert len(files) >= 5
    for name, (_, sentinel) in files.items():
        assert sentinel.exists(), f"payload '{name}' is not live"


@pytest.mark.parametrize("payload", TORCH)
def test_hostile_torch_checkpoint_refused(payload, ws, refs, tmp_path, capsys):
    """As a distillation checkpoint, an RDPO trainer state, a policy checkpoint and reward weights."""
    from epd.rewards.base import load_checkpoint

    sentinel = tmp_path / "SENTINEL"
    blob, _ = torch_payloads(sentinel)[payload]
    # distillation resumes from OUT/checkpoint.pt
    d = tmp_path / "distill"
    d.mkdir()
    (d / "checkpoint.pt").write_bytes(blob)
    rc, err = _cli(STAGES["distill"].argv(ws, d, {"teacher": refs("teacher")}), capsys)
    _refused(rc, err, d / "checkpoint.pt", sentinel, d, extra_ok=("checkpoint.pt",))
    assert "weights_only" not in err and "add_safe_globals" not in err  # torch's "trust it" advice is not passed on
    # RDPO resumes from OUT/checkpoints/trainer-state.pt
    r = tmp_path / "rdpo"
    (r / "checkpoints").mkdir(parents=True)
    (r / "checkpoints" / "trainer-state.pt").write_bytes(blob)
    rc, err = _cli(STAGES["rdpo"].argv(ws, r, {}), capsys)
    _refused(rc, err, r / "checkpoints" / "trainer-state.pt", sentinel, r,
             extra_ok=("trainer-state.pt", "resolved_config.yaml"))
    # policy checkpoint export
    p = tmp_path / "policy-step000004.pt"
    p.write_bytes(blob)
    rc, err = _cli(["rdpo-export", tmp_path, "--checkpoint", p, "--template", ws.init_table, "--output-dir",
                    tmp_path / "export"], capsys)
    _refused(rc, err, p, sentinel, tmp_path / "export")
    # reward-model weights (every scorer loads them through this function)
    w = tmp_path / "reward.pt"
    w.write_bytes(blob)
    with pytest.raises(EPDError, match="reward.pt"):
        load_checkpoint(w, "reward weights")
    assert not sentinel.exists()


# ---------------------------------------------------------------------------------------------- YAML, npz
def test_yaml_config_with_python_tag_is_not_executed(ws, tmp_path, capsys):
    sentinel = tmp_path / "SENTINEL"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"backbones: !!python/object/apply:os.system [\"touch '{sentinel}'\"]\n")
    subprocess.run([sys.executable, "-c", "import yaml, sys; yaml.unsafe_load(open(sys.argv[1]))", str(evil)],
                   timeout=60, capture_output=True)
    assert sentinel.exists(), "control: the YAML payload is live under yaml.unsafe_load"
    sentinel.unlink()
    for argv in (["validate-config", evil],
                 ["sample", "--config", evil, "--backbone", "d", "--solver", "euler", "--nfe", "2", "--outdir",
                  tmp_path / "s"],
                 ["teacher", "--config", evil, "--backbone", "g", "--nfe", "5", "--out", tmp_path / "t"],
                 ["backbone", "train", "--config", evil, "--out", tmp_path / "b"]):
        rc, err = _cli(argv, capsys)
        _refused(rc, err, evil, sentinel, tmp_path / "s")
        assert "YAML" in err, err


def test_npz_with_pickled_objects_is_not_unpickled(tmp_path):
    from epd.metrics.fid import load_stats

    sentinel = tmp_path / "SENTINEL"
    evil = tmp_path / "ref.npz"
    np.savez(evil, mu=np.array([_Reduce(os.system, f"touch '{sentinel}'")], dtype=object), sigma=np.eye(1))
    subprocess.run([sys.executable, "-c", "import numpy, sys; numpy.load(sys.argv[1], allow_pickle=True)['mu']",
                    str(evil)], timeout=60, capture_output=True)
    assert sentinel.exists(), "control: the npz payload is live with allow_pickle=True"
    sentinel.unlink()
    with pytest.raises(EPDError, match=r"ref\.npz.*(pickle|Object arrays)"):
        load_stats(evil)
    assert not sentinel.exists()


# ---------------------------------------------------------------------------------------------- corrupt safetensors
def corrupt_variants(good: bytes) -> dict[str, bytes]:
    """Truncations, huge declared sizes and inconsistent headers of a valid safetensors file."""
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    huge = dict(header)
    huge[name] = {**header[name], "shape": [1 << 31, 1 << 31]}
    past_end = dict(header)
    past_end[name] = {**header[name], "data_offsets": [0, len(good) * 1000]}

    def with_header(h):
        raw = json.dumps(h).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw + good[8 + n:]

    return {
        "empty file": b"",
        "7 bytes": good[:7],
        "truncated in the header": good[: 8 + n // 2],
        "truncated in the data": good[: 8 + n + (len(good) - 8 - n) // 2],
        "header size 2^62": struct.pack("<Q", 1 << 62) + good[8:],
        "header is not JSON": struct.pack("<Q", n) + b"\xff" * n + good[8 + n:],
        "tensor declares 2^62 elements": with_header(huge),
        "data offsets past the end": with_header(past_end),
    }


def _corrupt(path: Path, variant: str) -> Path:
    path.write_bytes(corrupt_variants(path.read_bytes())[variant])
    return path


def _valid_safetensors() -> bytes:
    from safetensors.torch import save

    return save({"a": torch.arange(6, dtype=torch.float32), "b": torch.ones(2, 2)})


VARIANTS = list(corrupt_variants(_valid_safetensors()))


@pytest.mark.parametrize("variant", VARIANTS)
def test_corrupt_safetensors_refused_everywhere(variant, ws, refs, tmp_path, capsys):
    sentinel = tmp_path / "SENTINEL"  # nothing here can execute code; kept for a uniform check
    # native snapshot
    shutil.copy(ws.init_table, tmp_path / "snap.safetensors")
    shutil.copy(ws.init_table.with_suffix(".json"), tmp_path / "snap.json")
    snap = _corrupt(tmp_path / "snap.safetensors", variant)
    out = tmp_path / "s0"
    for argv in (["predictor", "show", snap],
                 ["sample", "--config", ws.config, "--backbone", "d", "--weights", ws.digits, "--predictor_path", snap,
                  "--seeds", "0-1", "--outdir", out]):
        rc, err = _cli(argv, capsys)
        _refused(rc, err, snap, sentinel, out)
        assert "unreadable safetensors" in err, err
    # digits model and classifier
    for fname, argv in (("model.safetensors", lambda w: STAGES["sample"].argv(ws, tmp_path / "s1", {})),
                        ("classifier.safetensors", lambda w: STAGES["evaluate"].argv(ws, tmp_path / "e1",
                                                                                      {"sample": refs("sample")}))):
        w = tmp_path / f"w-{fname}"
        shutil.copytree(ws.digits, w)
        bad = _corrupt(w / fname, variant)
        args = [str(a).replace(str(ws.digits), str(w)) for a in argv(w)]
        rc, err = _cli(args, capsys)
        _refused(rc, err, bad, sentinel, tmp_path / ("s1" if fname.startswith("model") else "e1"))
    # digits training checkpoint (a resumed `epd backbone train`)
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({"backbones": {"digits": {"kind": "digits", "solvers": ["euler"], "nfes": [2],
                                                            "metrics": ["digits_alignment"], "train": TINY_DIGITS}}}))
    w = tmp_path / "w-train"
    shutil.copytree(ws.digits, w)
    (w / "model.json").unlink()
    shutil.copy(w / "model.safetensors", w / "checkpoint.safetensors")
    bad = _corrupt(w / "checkpoint.safetensors", variant)
    rc, err = _cli(["backbone", "train", "--config", cfg, "--out", w, "--no-progress"], capsys)
    _refused(rc, err, bad, sentinel)
    assert not (w / "model.json").exists()
    # teacher shard
    t = tmp_path / "teacher"
    shutil.copytree(refs("teacher"), t)
    bad = _corrupt(t / "shard-00003.safetensors", variant)
    rc, err = _cli(STAGES["distill"].argv(ws, tmp_path / "d", {"teacher": t}), capsys)
    _refused(rc, err, bad, sentinel, tmp_path / "d")
    assert "rerun `epd teacher`" in err
    # latents for rmse_vs_teacher
    lat = tmp_path / "latents.safetensors"
    from safetensors.torch import save_file

    save_file({"seeds": torch.arange(160), "latents": torch.zeros(160, 1, 8, 8)}, str(lat))
    bad = _corrupt(lat, variant)
    imgs = tmp_path / "imgs"
    shutil.copytree(refs("sample"), imgs)
    shutil.copy(lat, imgs / "latents.safetensors")
    rc, err = _cli(["evaluate", "--images", imgs, "--metrics", "rmse_vs_teacher", "--reference-latents", bad,
                    "--out-dir", tmp_path / "e2"], capsys)
    _refused(rc, err, bad, sentinel, tmp_path / "e2")
