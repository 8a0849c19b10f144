"""Legacy ``.pkl`` predictor import: every fixture loads, values equal an independent decode, hostile pickles are
refused without running anything, corrupt files give a clear error."""

from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
import pickletools
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from epd import predictor
from epd.cli import main as cli_main
from epd.errors import EPDError
from epd.legacy import LEGACY_MAGIC, backend_defaults, load_legacy_pickle

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import FIXTURES, needs  # noqa: E402

FIX = FIXTURES
PKLS = sorted(FIX.glob("**/*.pkl"))
PARAM_NAMES = ("r_params", "weight_s", "scale_dir_params", "scale_time_params")

pytestmark = needs("rlepd/predictors", "rlepd/smoke", "rlepd/runs", "iccv")


def _id(p: Path) -> str:
    return str(p.relative_to(FIX))


# ---------------------------------------------------------------------- an independent, minimal reader
def _raw_tables(path: Path) -> dict[str, np.ndarray]:
    """Read the raw parameter tables by walking the opcode stream: each parameter's storage bytes follow its
    name; the float data are the trailing ``4 n`` bytes, preceded by ``n`` as int64."""
    data = path.read_bytes()
    last_name, out = None, {}
    for op, arg, _ in pickletools.genops(data):
        if isinstance(arg, str) and arg in PARAM_NAMES:
            last_name = arg
        elif op.name in ("BINBYTES", "SHORT_BINBYTES", "BINBYTES8") and last_name in PARAM_NAMES \
                and last_name not in out:
            n = next(n for n in range(1, len(arg) // 4) if arg[-4 * n - 8:-4 * n] == struct.pack("<q", n))
            out[last_name] = np.frombuffer(arg[-4 * n:], dtype="<f4").astype(np.float64)
    return out


def _state(path: Path) -> dict:
    """Metadata attributes, read with the stdlib unpickler and every global replaced by a dummy."""

    class Dummy:
        def __init__(self, *a):
            pass

        def __setstate__(self, s):
            pass

    class U(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("torch_utils.persistence", "_reconstruct_persistent_obj"):
                return lambda meta: meta
            return Dummy

    return U(io.BytesIO(path.read_bytes())).load()["model"]["state"]


def _independent_decode(path: Path):
    raw = _raw_tables(path)
    st = _state(path)
    K = st["num_points"]
    r = 1 / (1 + np.exp(-raw["r_params"].reshape(-1, K)))
    ws = raw["weight_s"].reshape(-1, K)
    w = np.exp(ws - ws.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    scales = {}
    for name, rng in (("scale_dir_params", st["scale_dir"]), ("scale_time_params", st["scale_time"])):
        if rng > 0:
            scales[name] = (1 - rng) + 2 * rng / (1 + np.exp(-0.5 * raw[name].reshape(-1, K)))
    order = np.argsort(r, axis=1, kind="stable")
    take = lambda a: np.take_along_axis(a, order, 1)  # noqa: E731
    return take(r), take(w), {k: take(v) for k, v in scales.items()}, raw, st


# ---------------------------------------------------------------------- fixtures load and decode correctly
@pytest.mark.parametrize("path", PKLS, ids=_id)
def test_fixture_equals_independent_decode(path):
    table = load_legacy_pickle(path)
    r, w, scales, raw, st = _independent_decode(path)
    assert table.num_steps == st["num_steps"] and table.num_points == st["num_points"]
    np.testing.assert_allclose(table.positions.numpy(), r, rtol=0, atol=1e-12)
    np.testing.assert_allclose(table.weights.numpy(), w, rtol=0, atol=1e-12)
    for name, attr in (("scale_dir_params", "scale_dir"), ("scale_time_params", "scale_time")):
        got = getattr(table, attr)
        if name in scales:
            np.testing.assert_allclose(got.numpy(), scales[name], rtol=0, atol=1e-12)
        else:
            assert got is None
    for name in PARAM_NAMES:  # the raw tables kept in provenance are exactly the stored float32 values
        np.testing.assert_array_equal(np.asarray(table.provenance["raw"][name]).ravel(), raw[name])
    # module_src is kept as text (hashed), never run: compare with the source found in the opcode stream
    assert table.provenance["module_src_sha1"] == hashlib.sha1(_module_src(path).encode()).hexdigest()


def _module_src(path: Path) -> str:
    for op, arg, _ in pickletools.genops(path.read_bytes()):
        if op.name.endswith("UNICODE") and isinstance(arg, str) and arg.startswith("import "):
            return arg
    raise AssertionError("no module_src")


@pytest.mark.parametrize("path", PKLS, ids=_id)
def test_native_round_trip_is_exact(path, tmp_path):
    table = load_legacy_pickle(path)
    out = predictor.save(table, tmp_path / "snap")
    back = predictor.load(out)
    for k, v in table.tensors().items():
        assert torch.equal(back.tensors()[k], v), k
    assert back.tensors().keys() == table.tensors().keys()
    assert back.meta == json.loads(json.dumps(table.meta))
    assert back.provenance == json.loads(json.dumps(table.provenance))


def test_backend_mapping_and_metadata_sources():
    f512 = load_legacy_pickle(FIX / "rlepd/predictors/f512/network-snapshot-000005.pkl")
    assert (f512.meta["backbone"], f512.meta["coords"], f512.meta["img_resolution"]) == ("sd3", "flow", 512)
    assert f512.provenance["meta_sources"]["sigma_min"] == "attribute"
    # pre-2026-03-30 export: the sigma range lives only in backend_config
    old = load_legacy_pickle(FIX / "rlepd/runs/sd3_512_new/network-snapshot-export-step001000.pkl")
    assert old.provenance["meta_sources"]["sigma_min"] == "backend_config"
    assert old.meta["sigma_min"] == f512.meta["sigma_min"] == 3 * 1e-3 / (1 + 2 * 1e-3)
    # FLUX cold start records no sigma/mu; the backend defaults must equal what the FLUX backend itself wrote
    # into the export of the same smoke run.
    flux_dir = FIX / "rlepd/smoke/flux_smoke_003"
    start = load_legacy_pickle(flux_dir / "fake/fflux/network-snapshot-000005.pkl")
    export = load_legacy_pickle(next(flux_dir.glob("runs/*/export/*.pkl")))
    assert start.provenance["meta_sources"]["flowmatch_mu"] == "default"
    assert export.provenance["meta_sources"]["flowmatch_mu"] == "attribute"
    for k in ("sigma_min", "sigma_max", "flowmatch_mu", "flowmatch_shift"):
        assert start.meta[k] == pytest.approx(export.meta[k], rel=1e-12), k
    assert (start.meta["backbone"], start.meta["coords"]) == ("flux", "flow")
    # SD1.5 defaults agree with the sigma range the original stored (in float32) in a Stage-1 loss_fn
    s1 = load_legacy_pickle(FIX / "rlepd/predictors/00036-sd15-distilled-stage1/network-snapshot-000005.pkl")
    d = backend_defaults("ldm")
    assert d["sigma_min"] == pytest.approx(s1.meta["sigma_min"], rel=2e-5)
    assert d["sigma_max"] == pytest.approx(s1.meta["sigma_max"], rel=2e-5)
    f15 = load_legacy_pickle(FIX / "rlepd/predictors/f15/network-snapshot-000005.pkl")
    assert (f15.meta["backbone"], f15.meta["coords"]) == ("sd15", "edm")


def test_oldest_layout_and_iccv_layout():
    old = load_legacy_pickle(FIX / "rlepd/predictors/99999-ms_coco-11-20-epd-dpm-1-discrete"
                             / "network-snapshot-099999.pkl")
    assert old.provenance["generation"] == "pre-backend" and old.meta["backbone"] == "sd15"
    assert old.num_steps == 11 and old.provenance["module_src_sha1"].startswith("d6599fa9")
    iccv = load_legacy_pickle(FIX / "iccv/00017-cifar10-3-3-ipndm-uni1.0-afs/network-snapshot-000010.pkl")
    assert iccv.meta["dataset_name"] == "cifar10" and iccv.meta["backbone"] is None
    assert iccv.meta["sampler_stu"] == "ipndm" and iccv.meta["afs"] is True and iccv.meta["max_order"] == 3
    assert iccv.scale_dir is not None and iccv.scale_time is not None
    assert iccv.provenance["loss_fn"]["solver_stu"] == "solvers.ipndm_sampler"
    # spec §2: ICCV CIFAR-10 time_uniform N=3 grid
    np.testing.assert_allclose(iccv.provenance["reference_t_steps"], [80, 2.8237, 0.00201], rtol=0, atol=5.1e-5)


def test_stage1_loss_fn_schedule_equals_spec_vector():
    t = load_legacy_pickle(FIX / "rlepd/predictors/00036-sd15-distilled-stage1/network-snapshot-000005.pkl")
    assert t.provenance["layout"] == "model+loss_fn"
    spec_n10 = [14.6146, 7.8399, 4.6092, 2.9183, 1.9502, 1.3449, 0.9324, 0.6250, 0.3687, 0.0292]  # spec §2
    ref = t.provenance["reference_t_steps"]
    assert len(ref) == t.num_steps == 10
    np.testing.assert_allclose(ref, spec_n10, rtol=0, atol=5.1e-5)


def test_reordered_rows_are_recorded(tmp_path):
    # swap the two points of step 1: sorting must restore the table and record row 1
    r = [[-1.0, 1.0], [1.0, -1.0]]
    w = [[0.3, -0.2], [0.5, 0.1]]
    table = load_legacy_pickle(_write(tmp_path / "swap.pkl", _predictor(r, w)))
    assert table.provenance["reordered_rows"] == [1]
    s = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    assert table.positions[1].tolist() == pytest.approx([s(-1.0), s(1.0)], abs=1e-7)
    e = [math.exp(0.5), math.exp(0.1)]
    assert table.weights[1].tolist() == pytest.approx([e[1] / sum(e), e[0] / sum(e)], abs=1e-7)


# ---------------------------------------------------------------------- CLI
@pytest.mark.parametrize("path", PKLS, ids=_id)
def test_cli_show_every_fixture(path, capsys):
    assert cli_main(["predictor", "show", str(path)]) == 0
    out = capsys.readouterr().out
    t = load_legacy_pickle(path)
    assert f"N={t.num_steps} grid points" in out and f"K={t.num_points}" in out


def test_cli_convert_writes_native_snapshot(tmp_path, capsys):
    src = FIX / "iccv/00001-cifar10-3-3-epd-uni1.0-afs/network-snapshot-000010.pkl"
    assert cli_main(["predictor", "convert", str(src), str(tmp_path) + "/"]) == 0
    back = predictor.load(tmp_path / "network-snapshot-000010.safetensors")
    assert back.equal(load_legacy_pickle(src))
    assert cli_main(["predictor", "convert", str(src), str(tmp_path / "named.json")]) == 0
    assert (tmp_path / "named.safetensors").is_file() and (tmp_path / "named.json").is_file()
    assert cli_main(["predictor", "show", str(tmp_path / "missing.pkl")]) == 2
    assert "missing.pkl" in capsys.readouterr().err


# ---------------------------------------------------------------------- a tiny pickle assembler for crafted files
class G:
    """A global ``module.name`` written as STACK_GLOBAL without importing anything."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *a):  # pickle requires a callable reduce target
        raise AssertionError


class Call:
    """``func(*args)`` written as REDUCE."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args

    def __call__(self, *a):  # a Call may itself be a reduce target (a call of a call's result)
        raise AssertionError


class Pid:
    """A persistent id (BINPERSID)."""

    def __init__(self, value):
        self.value = value


class _Asm(pickle._Pickler):
    dispatch = pickle._Pickler.dispatch.copy()

    def _save_g(self, obj):
        self.save(obj.module)
        self.save(obj.name)
        self.write(pickle.STACK_GLOBAL)

    dispatch[G] = _save_g

    def persistent_id(self, obj):
        return obj.value if isinstance(obj, Pid) else None


def asm(obj, protocol=4) -> bytes:
    f = io.BytesIO()
    _Asm(f, protocol).dump(obj)
    return f.getvalue()


def storage_bytes(values, *, numel=None, count=None, descr=None, keys=None, extra=b"", magic=LEGACY_MAGIC) -> bytes:
    """Legacy ``torch.save`` bytes of one FloatStorage, with knobs to corrupt each part."""
    data = struct.pack(f"<{len(values)}f", *values)
    n = len(values) if numel is None else numel
    descr = descr if descr is not None else Pid(("storage", G("torch", "FloatStorage"), "k0", "cpu", n, None))
    return (pickle.dumps(magic, 2) + pickle.dumps(1001, 2)
            + pickle.dumps({"protocol_version": 1001, "little_endian": True}, 2)
            + asm(descr, 2) + pickle.dumps(keys if keys is not None else ["k0"], 2)
            + struct.pack("<q", n if count is None else count) + data + extra)


def tensor(values_2d, blob=None):
    rows, cols = len(values_2d), len(values_2d[0])
    flat = [v for row in values_2d for v in row]
    blob = storage_bytes(flat) if blob is None else blob
    t = Call(G("torch._utils", "_rebuild_tensor_v2"), Call(G("torch.storage", "_load_from_bytes"), blob),
             0, (rows, cols), (cols, 1), False, Call(G("collections", "OrderedDict")))
    return Call(G("torch._utils", "_rebuild_parameter"), t, True, Call(G("collections", "OrderedDict")))


def _predictor(r, w, *, module_src="import torch\n", params=None, extra_state=None) -> dict:
    zeros = [[0.0] * len(r[0]) for _ in r]
    state = {"training": False,
             "_parameters": params or {"r_params": tensor(r), "scale_dir_params": tensor(zeros),
                                       "scale_time_params": tensor(zeros), "weight_s": tensor(w)},
             "_modules": {"sigmoid": Call(G("torch.nn.modules.activation", "Sigmoid"))},
             "dataset_name": "ms_coco", "num_steps": len(r) + 1, "num_points": len(r[0]), "guidance_type": "cfg",
             "guidance_rate": 4.5, "schedule_type": "flowmatch", "schedule_rho": 1.0, "afs": False,
             "scale_dir": 0.0, "scale_time": 0.0, "backend": "sd3", "backend_config": {"resolution": 512},
             "img_resolution": 512, "_init_args": (), "_init_kwargs": {}}
    state.update(extra_state or {})
    meta = {"type": "class", "version": 6, "module_src": module_src, "class_name": "EPD_predictor", "state": state}
    return {"model": Call(G("torch_utils.persistence", "_reconstruct_persistent_obj"), meta)}


def _write(path: Path, obj, protocol=4) -> Path:
    path.write_bytes(obj if isinstance(obj, bytes) else asm(obj, protocol))
    return path


def test_crafted_predictor_loads(tmp_path):
    """Positive control for the assembler: a well-formed crafted file decodes to the expected numbers."""
    r, w = [[-0.5, 0.7]], [[0.2, -0.1]]
    t = load_legacy_pickle(_write(tmp_path / "ok.pkl", _predictor(r, w)))
    assert t.positions[0].tolist() == pytest.approx([1 / (1 + math.exp(0.5)), 1 / (1 + math.exp(-0.7))], abs=1e-7)
    assert t.meta["backbone"] == "sd3" and t.num_steps == 2


# ---------------------------------------------------------------------- hostile pickles
def _payloads(sentinel: Path) -> dict[str, tuple[bytes, bytes | None]]:
    """name -> (file bytes, bytes that a plain ``pickle.loads`` turns into the sentinel file: the whole file, or
    for nested payloads the nested pickle that carries it; None for a payload that only abuses the format)."""
    s = str(sentinel)
    write = f"open({s!r}, 'w').write('pwned')"
    ok_r, ok_w = [[0.1, 0.2]], [[0.0, 0.0]]
    sysc = Call(G("os", "system"), f"touch '{s}'")
    fs = G("torch", "FloatStorage")
    evil_descr = Pid(("storage", fs, "k0", "cpu", 2, sysc))
    two_refs = (Pid(("storage", fs, "k0", "cpu", 2, None)), Pid(("storage", fs, "k1", "cpu", 2, None)))

    def in_storage(descr):
        blob = storage_bytes([0.1, 0.2], descr=descr)
        return asm(_predictor(ok_r, ok_w, params={"r_params": tensor(ok_r, blob=blob), "weight_s": tensor(ok_w)}))

    def whole(obj, protocol=4):
        data = asm(obj, protocol)
        return data, data

    return {
        "os.system via __reduce__": whole({"model": sysc}),
        "posix.system (what os.system pickles as)": whole({"model": Call(G("posix", "system"), f"touch '{s}'")}),
        "builtins.eval": whole({"model": Call(G("builtins", "eval"), write)}),
        "builtins.exec": whole({"model": Call(G("builtins", "exec"), write)}),
        "getattr(__import__('os'), 'system')": whole({"model": Call(Call(G("builtins", "getattr"), Call(
            G("builtins", "__import__"), "os"), "system"), f"touch '{s}'")}),
        "dotted getattr chain os.path.os.system": whole({"model": Call(G("os", "path.os.system"), f"touch '{s}'")}),
        "subprocess.Popen": whole({"model": Call(G("subprocess", "Popen"), ["touch", s])}),
        "protocol-0 INST os.system": (f"(S'touch {s}'\nios\nsystem\n.".encode(),) * 2,
        "exec hidden in an allowed call's args": whole({"x": Call(G("collections", "OrderedDict"), Call(
            G("builtins", "exec"), write)), **_predictor(ok_r, ok_w)}),
        "os.system inside a top-level persistent id": whole({"model": Pid(("storage", sysc))}),
        "harmless top-level persistent id": (asm({"model": Pid("storage")}), None),
        "payload inside _load_from_bytes bytes": (in_storage(sysc), asm(sysc, 2)),
        "payload inside a nested persistent id": (in_storage(evil_descr), asm(sysc, 2)),
        "two nested persistent loads": (in_storage(two_refs), None),
    }


def _plain_unpickle_in_subprocess(data: bytes, cwd: Path) -> None:
    subprocess.run([sys.executable, "-c", "import pickle, sys\ntry:\n pickle.loads(sys.stdin.buffer.read())\n"
                    "except Exception:\n pass"], input=data, cwd=cwd, timeout=60, check=False,
                   capture_output=True)


def test_hostile_payloads_are_live_under_plain_pickle(tmp_path):
    """The payloads are real: the stdlib unpickler (in a child process) creates the sentinel."""
    sentinel = tmp_path / "SENTINEL"
    for name, (_, live) in _payloads(sentinel).items():
        if live is None:
            continue
        _plain_unpickle_in_subprocess(live, tmp_path)
        deadline = time.monotonic() + 10  # Popen's child may finish after the interpreter exits
        while not sentinel.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sentinel.exists(), f"payload '{name}' is not live"
        sentinel.unlink()


@pytest.mark.parametrize("name", list(_payloads(Path("/x"))))
def test_hostile_payload_refused_without_executing(name, tmp_path):
    sentinel = tmp_path / "SENTINEL"
    data, _ = _payloads(sentinel)[name]
    path = _write(tmp_path / "evil.pkl", data)
    with pytest.raises(EPDError) as e:
        load_legacy_pickle(path)
    assert str(path) in str(e.value)
    assert "refused" in str(e.value) or "exactly one" in str(e.value), str(e.value)
    assert not sentinel.exists()


def test_refusal_names_the_global(tmp_path):
    path = _write(tmp_path / "e.pkl", {"model": Call(G("subprocess", "Popen"), ["true"])})
    with pytest.raises(EPDError, match=r"refused global 'subprocess\.Popen'"):
        load_legacy_pickle(path)


def test_persistence_module_src_is_never_executed(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    src = f"open({str(sentinel)!r}, 'w').write('pwned')\nimport torch\n"
    exec(compile(src, "<module_src>", "exec"), {})  # live: running the embedded source creates the sentinel
    assert sentinel.exists()
    sentinel.unlink()
    t = load_legacy_pickle(_write(tmp_path / "p.pkl", _predictor([[0.1, 0.2]], [[0.0, 0.0]], module_src=src)))
    assert not sentinel.exists()
    assert t.provenance["module_src_sha1"] == hashlib.sha1(src.encode()).hexdigest()


@pytest.mark.parametrize("kind", ["storage numel", "count field", "tensor size", "negative stride"])
def test_huge_or_inconsistent_sizes_refused(kind, tmp_path):
    r, w = [[0.1, 0.2]], [[0.0, 0.0]]
    if kind == "storage numel":
        blob = storage_bytes([0.1, 0.2], numel=1 << 40)
        obj = _predictor(r, w, params={"r_params": tensor(r, blob=blob), "weight_s": tensor(w)})
    elif kind == "count field":
        blob = storage_bytes([0.1, 0.2], count=1 << 40)
        obj = _predictor(r, w, params={"r_params": tensor(r, blob=blob), "weight_s": tensor(w)})
    else:
        size, stride = ((1 << 30, 1 << 30), (1, 1)) if kind == "tensor size" else ((1, 2), (-1, 1))
        t = Call(G("torch._utils", "_rebuild_tensor_v2"), Call(G("torch.storage", "_load_from_bytes"),
                 storage_bytes([0.1, 0.2])), 0, size, stride, False, Call(G("collections", "OrderedDict")))
        obj = _predictor(r, w, params={"r_params": t, "weight_s": tensor(w)})
    path = _write(tmp_path / "big.pkl", obj)
    with pytest.raises(EPDError, match="big.pkl"):
        load_legacy_pickle(path)


@pytest.mark.parametrize("kind", ["magic", "keys", "trailing data in storage", "big-endian header"])
def test_malformed_storage_bytes_refused(kind, tmp_path):
    r, w = [[0.1, 0.2]], [[0.0, 0.0]]
    if kind == "magic":
        blob = storage_bytes([0.1, 0.2], magic=1234)
    elif kind == "keys":
        blob = storage_bytes([0.1, 0.2], keys=["other"])
    elif kind == "trailing data in storage":
        blob = storage_bytes([0.1, 0.2], extra=b"\0" * 4)
    else:
        blob = storage_bytes([0.1, 0.2]).replace(pickle.dumps({"protocol_version": 1001, "little_endian": True}, 2),
                                                  pickle.dumps({"protocol_version": 1001, "little_endian": False}, 2))
    obj = _predictor(r, w, params={"r_params": tensor(r, blob=blob), "weight_s": tensor(w)})
    with pytest.raises(EPDError):
        load_legacy_pickle(_write(tmp_path / "m.pkl", obj))


# ---------------------------------------------------------------------- corrupt files
@pytest.mark.parametrize("frac", [0.0, 0.01, 0.3, 0.6, 0.999])
def test_truncated_fixture_gives_clear_error(frac, tmp_path):
    data = (FIX / "rlepd/predictors/f15/network-snapshot-000005.pkl").read_bytes()
    path = _write(tmp_path / "trunc.pkl", data[: int(len(data) * frac)])
    with pytest.raises(EPDError, match=r"trunc\.pkl.*(truncated or corrupt|refused)"):
        load_legacy_pickle(path)


def test_corrupt_and_wrong_content_give_clear_errors(tmp_path):
    data = (FIX / "rlepd/predictors/f15/network-snapshot-000005.pkl").read_bytes()
    cases = {
        "garbage.pkl": bytes(range(256)) * 4,
        "trailing.pkl": data + b"extra",
        "list.pkl": pickle.dumps([1, 2, 3]),
        "nomodel.pkl": pickle.dumps({"ema": 1}),
    }
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # a flipped byte inside the module source or a storage
    cases["flipped.pkl"] = bytes(flipped)
    for name, blob in cases.items():
        path = _write(tmp_path / name, blob)
        try:
            load_legacy_pickle(path)
        except EPDError as e:
            assert name in str(e), (name, str(e))
        else:
            assert name == "flipped.pkl", f"{name} loaded without error"
    with pytest.raises(EPDError, match="cannot read"):
        load_legacy_pickle(tmp_path / "absent.pkl")
