"""Malformed inputs through the CLI: configs (schema), prompt files, seed specs, predictor metadata, image
directories and flags. Each case: exit code 2, one ``error:`` line naming the input (file, field or value) and
no traceback, and no file written under the output folder. Controls show that the well-formed neighbour of a
case works (CRLF/BOM prompt files, hidden folders in image directories, a metric run alone)."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from epd.cli import main as cli_main

from .harness import base_config, visible_files

CASES: dict[str, callable] = {}


def case(name):
    def deco(fn):
        CASES[name] = fn
        return fn
    return deco


def _config(tmp: Path, ws, edit=None, text: str | None = None) -> Path:
    p = tmp / "config.yaml"
    if text is not None:
        p.write_text(text)
        return p
    cfg = copy.deepcopy(base_config(ws.gmm_prompts))
    if edit:
        edit(cfg)
    p.write_text(yaml.safe_dump(cfg))
    return p


def _sample(ws, tmp, config=None, backbone="d", extra=(), solver=("--solver", "euler", "--nfe", "4")):
    return ["sample", "--config", config or ws.config, "--backbone", backbone, "--weights", ws.digits, *solver,
            "--seeds", "0-3", "--outdir", tmp / "out", *extra]


def _teacher(ws, tmp, config):
    return ["teacher", "--config", config, "--backbone", "g", "--nfe", "5", "--out", tmp / "out", "--seeds", "0-7"]


# ---------------------------------------------------------------------------------------------- configs (schema)
@case("config: unknown top-level key")
def _(ws, tmp):
    return _sample(ws, tmp, _config(tmp, ws, lambda c: c.update(bogus=1))), ["bogus"]


@case("config: backbone without kind")
def _(ws, tmp):
    return _sample(ws, tmp, _config(tmp, ws, lambda c: c["backbones"]["d"].pop("kind"))), ["backbones.d", "kind"]


@case("config: unknown backbone kind")
def _(ws, tmp):
    return _sample(ws, tmp, _config(tmp, ws, lambda c: c["backbones"]["d"].update(kind="sd99"))), \
        ["backbones.d.kind", "allowed"]


@case("config: negative NFE")
def _(ws, tmp):
    return _sample(ws, tmp, _config(tmp, ws, lambda c: c["backbones"]["d"].update(nfes=[-1]))), ["backbones.d.nfes.0"]


@case("config: unknown solver")
def _(ws, tmp):
    return _sample(ws, tmp, _config(tmp, ws, lambda c: c["backbones"]["d"].update(solvers=["rk45"]))), \
        ["backbones.d.solvers.0", "rk45"]


@case("config: K = 0")
def _(ws, tmp):
    return _sample(ws, tmp, _config(tmp, ws, lambda c: c["backbones"]["d"]["student"].update(num_points=0))), \
        ["backbones.d.student.num_points"]


@case("config: empty metric list")
def _(ws, tmp):
    return _sample(ws, tmp, _config(tmp, ws, lambda c: c["backbones"]["d"].update(metrics=[]))), ["backbones.d.metrics"]


@case("config: YAML syntax error")
def _(ws, tmp):
    return _sample(ws, tmp, _config(tmp, ws, text="backbones: {d: [\n")), ["config.yaml", "not valid YAML"]


@case("config: top level is a list")
def _(ws, tmp):
    return _sample(ws, tmp, _config(tmp, ws, text="- 1\n- 2\n")), ["config.yaml", "mapping"]


@case("config: empty file")
def _(ws, tmp):
    return _sample(ws, tmp, _config(tmp, ws, text="")), ["config.yaml", "backbones"]


@case("config: file missing")
def _(ws, tmp):
    return _sample(ws, tmp, tmp / "nope.yaml"), ["nope.yaml", "not found"]


@case("config: backbone name with capitals")
def _(ws, tmp):
    return _sample(ws, tmp, _config(tmp, ws, lambda c: c["backbones"].update(Bad=c["backbones"]["d"]))), ["Bad"]


@case("config: unknown distill key")
def _(ws, tmp):
    cfg = _config(tmp, ws, lambda c: c["backbones"]["g"]["distill"].update(iterationz=3))
    return ["distill", "--config", cfg, "--backbone", "g", "--nfe", "5", "--teacher", tmp, "--out", tmp / "out"], \
        ["distill", "iterationz"]


@case("config: RDPO leave-one-out group of 1")
def _(ws, tmp):
    cfg = _config(tmp, ws, lambda c: c["backbones"]["d"]["rdpo"].update(rloo_k=1, rollout_batch_size=2))
    return ["rdpo", "--config", cfg, "--backbone", "d", "--weights", ws.digits, "--init", ws.init_table,
            "--out", tmp / "out"], ["rdpo.rloo_k"]


@case("config: negative teacher M")
def _(ws, tmp):
    return _teacher(ws, tmp, _config(tmp, ws, lambda c: c["backbones"]["g"]["teacher"].update(M=-1))), \
        ["backbones.g.teacher.M"]


@case("--backbone not in the config")
def _(ws, tmp):
    return _sample(ws, tmp, backbone="sd3"), ["'sd3'", "configured"]


# ---------------------------------------------------------------------------------------------- prompt files
def _prompt_file(tmp, name, data: bytes):
    p = tmp / name
    p.write_bytes(data)
    return p


@case("prompts: empty file")
def _(ws, tmp):
    f = _prompt_file(tmp, "p.txt", b"")
    return _sample(ws, tmp, extra=("--prompt-file", f)), ["p.txt", "no prompts"]


@case("prompts: blank lines only")
def _(ws, tmp):
    f = _prompt_file(tmp, "p.txt", b"\n  \r\n\t\n")
    return _sample(ws, tmp, extra=("--prompt-file", f)), ["p.txt", "no prompts"]


@case("prompts: binary file")
def _(ws, tmp):
    f = _prompt_file(tmp, "p.txt", b"\x89PNG\r\n\x1a\n\x00\x00")
    return _sample(ws, tmp, extra=("--prompt-file", f)), ["p.txt", "binary"]


@case("prompts: Latin-1 bytes")
def _(ws, tmp):
    f = _prompt_file(tmp, "p.txt", "caf\xe9 au lait\n".encode("latin-1"))
    return _sample(ws, tmp, extra=("--prompt-file", f)), ["p.txt", "UTF-8"]


@case("prompts: CSV without a text column")
def _(ws, tmp):
    f = _prompt_file(tmp, "p.csv", b"id,file_name\n0,a.jpg\n")
    return _sample(ws, tmp, extra=("--prompt-file", f)), ["p.csv", "['id', 'file_name']", "expected one of"]


@case("prompts: CSV header only")
def _(ws, tmp):
    f = _prompt_file(tmp, "p.csv", b"text\n")
    return _sample(ws, tmp, extra=("--prompt-file", f)), ["p.csv", "no prompts"]


@case("prompts: file missing")
def _(ws, tmp):
    return _sample(ws, tmp, extra=("--prompt-file", tmp / "gone.txt")), ["gone.txt", "not found"]


@case("prompts: not a digit prompt")
def _(ws, tmp):
    f = _prompt_file(tmp, "p.txt", b"a handwritten digit seven\na photo of a cat\n")
    return _sample(ws, tmp, extra=("--prompt-file", f)), ["'a photo of a cat'", "accepted forms"]


@case("prompts: GMM class index out of range")
def _(ws, tmp):
    f = _prompt_file(tmp, "p.txt", b"0\n7\n")
    cfg = _config(tmp, ws, lambda c: c["backbones"]["g"]["teacher"].update(prompts=str(f)))
    return _teacher(ws, tmp, cfg), ["prompts", "out of range", "7"]


@case("prompts: --prompt and --prompt-file together")
def _(ws, tmp):
    return _sample(ws, tmp, extra=("--prompt", "7", "--prompt-file", ws.gmm_prompts)), ["--prompt", "--prompt-file"]


# ---------------------------------------------------------------------------------------------- seeds
def _seeds(ws, tmp, spec):
    argv = _sample(ws, tmp)
    argv[argv.index("--seeds") + 1] = spec
    return argv


for _spec, _msg in [("5-2", "descending"), ("", "empty"), ("a-b", "cannot parse"), ("-3", "[0, 2^32)"),
                    ("1,,2", "cannot parse"), ("1.5", "cannot parse"), ("0-99999999999", "[0, 2^32)"),
                    ("0-3,2", "2 appears more than once"), ("0-20000000", "more than 10,000,000")]:
    CASES[f"seeds: {_spec!r}"] = (lambda s, m: lambda ws, tmp: (_seeds(ws, tmp, s), ["seeds", m]))(_spec, _msg)


# ---------------------------------------------------------------------------------------------- predictor metadata
def _snapshot(ws, tmp, edit_json=None, edit_tensors=None, drop_json=False) -> Path:
    from safetensors.torch import load_file, save_file

    st, js = tmp / "snap.safetensors", tmp / "snap.json"
    shutil.copy(ws.init_table, st)
    shutil.copy(ws.init_table.with_suffix(".json"), js)
    if edit_tensors:
        t = load_file(str(st))
        edit_tensors(t)
        save_file(t, str(st))
        doc = json.loads(js.read_text())
        doc.pop("tensors_sha256")
        js.write_text(json.dumps(doc))
    if edit_json:
        doc = json.loads(js.read_text())
        res = edit_json(doc)
        js.write_text(res if isinstance(res, str) else json.dumps(doc))
    if drop_json:
        js.unlink()
    return st


def _with_table(ws, tmp, snap):
    return ["sample", "--config", ws.config, "--backbone", "d", "--weights", ws.digits, "--predictor_path", snap,
            "--seeds", "0-3", "--outdir", tmp / "out"]


PREDICTOR_CASES = {
    "metadata JSON missing": (dict(drop_json=True), ["snap.json", "missing"]),
    "format is not epd-table": (dict(edit_json=lambda d: d.update(format="something-else")), ["snap.json", "format"]),
    "format_version from the future": (dict(edit_json=lambda d: d.update(format_version=99)),
                                       ["snap.json", "newer than this epd"]),
    "format_version is a string": (dict(edit_json=lambda d: d.update(format_version="1")),
                                   ["snap.json", "format_version must be an integer"]),
    "meta is a list": (dict(edit_json=lambda d: d.update(meta=[1, 2])), ["snap.json", "'meta' must be a JSON object"]),
    "tensors from another save": (dict(edit_json=lambda d: d.update(tensors_sha256="0" * 64)),
                                  ["snap.safetensors", "does not belong to snap.json"]),
    "weights tensor missing": (dict(edit_tensors=lambda t: t.pop("weights")), ["snap.safetensors", "['weights']"]),
    "positions not increasing": (dict(edit_tensors=lambda t: t["positions"].copy_(t["positions"].flip(1))),
                                 ["snap.safetensors", "strictly increasing"]),
    "weights not on the simplex": (dict(edit_tensors=lambda t: t["weights"].mul_(2)), ["snap.safetensors", "sum to 1"]),
    "NaN position": (dict(edit_tensors=lambda t: t["positions"].__setitem__((0, 0), float("nan"))),
                     ["snap.safetensors", "NaN"]),
    "snapshot for another backbone": (dict(edit_json=lambda d: d["meta"].update(backbone="sd3")),
                                      ["backbone: snapshot has 'sd3'", "'digits'"]),
    "unknown schedule in metadata": (dict(edit_json=lambda d: d["meta"].update(schedule_type="warp")), ["warp"]),
}
PREDICTOR_CASES["metadata not JSON"] = (dict(edit_json=lambda d: "{not json"), ["snap.json", "not valid JSON"])
for _name, (_kw, _msg) in PREDICTOR_CASES.items():
    CASES[f"predictor: {_name}"] = (lambda kw, m: lambda ws, tmp: (_with_table(ws, tmp, _snapshot(ws, tmp, **kw)), m))(
        _kw, _msg)


# ---------------------------------------------------------------------------------------------- image directories
def _images(tmp, refs, n=4) -> Path:
    d = tmp / "imgs"
    d.mkdir()
    for i in range(n):
        for ext in (".png", ".json"):
            shutil.copy(refs("sample") / f"{i:06d}{ext}", d / f"{i:06d}{ext}")
    return d


def _evaluate(ws, tmp, images, *extra, metrics=("digits_alignment",)):
    return ["evaluate", "--images", images, "--metrics", *metrics, "--weights-dir", ws.digits, "--out-dir",
            tmp / "out", "--device", "cpu", *extra]


def _image_case(edit, msg, metrics=("digits_alignment",), extra=()):
    def build(ws, tmp, refs):
        d = _images(tmp, refs)
        more = edit(d, tmp)
        more = more if isinstance(more, tuple) else ()  # an edit returns a tuple of extra flags, or anything else
        return _evaluate(ws, tmp, d, *extra, *more, metrics=metrics), msg
    build.needs_refs = True
    return build


def _png16(d, tmp):
    from PIL import Image

    (d / "000001.png").unlink()
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(d / "000001.png")


IMAGE_CASES = {
    "directory missing": (lambda d, t: shutil.rmtree(d), ["imgs", "not found"]),
    "no images": (lambda d, t: [p.unlink() for p in d.glob("*.png")], ["imgs", "contains no images"]),
    "image without sidecar": (lambda d, t: (d / "000002.json").unlink(), ["000002.png", "no sidecar"]),
    "sidecar not JSON": (lambda d, t: (d / "000002.json").write_text("{oops"), ["000002.json", "not valid JSON"]),
    "sidecar without prompt": (lambda d, t: (d / "000002.json").write_text('{"seed": 2}'),
                               ["000002.json", "'prompt'"]),
    "sidecar seed is a string": (lambda d, t: (d / "000002.json").write_text('{"seed": "2", "prompt": "7"}'),
                                 ["000002.json", "'seed' must be an integer"]),
    "truncated PNG": (lambda d, t: (d / "000003.png").write_bytes((d / "000003.png").read_bytes()[:40]),
                      ["000003.png", "cannot be decoded"]),
    "16-bit PNG": (_png16, ["000001.png", "mode"]),
    "prompt list does not match": (lambda d, t: ("--prompts", _prompt_file(t, "other.txt", b"seven\n")),
                                   ["other.txt", "not in"]),
    "--out-dir is --images": (lambda d, t: ("--out-dir", d), ["--out (alias --out-dir) must differ from --images"]),
    "unknown metric": (None, ["--metrics", "ssim"]),
    "--batch-size 0": (lambda d, t: ("--batch-size", "0"), ["--batch-size"]),
}
for _name, (_edit, _msg) in IMAGE_CASES.items():
    if _name == "unknown metric":
        CASES[f"images: {_name}"] = _image_case(lambda d, t: None, _msg, metrics=("ssim",))
    else:
        CASES[f"images: {_name}"] = _image_case(_edit, _msg)


# ---------------------------------------------------------------------------------------------- flags
@case("flags: --batch 0")
def _(ws, tmp):
    return _sample(ws, tmp, extra=("--batch", "0")), ["--batch"]


@case("flags: --nfe and --steps")
def _(ws, tmp):
    return _sample(ws, tmp, solver=("--solver", "euler", "--nfe", "4", "--steps", "3")), ["--nfe", "--steps"]


@case("flags: EPD solver without a snapshot")
def _(ws, tmp):
    return _sample(ws, tmp, solver=("--solver", "epd",)), ["--predictor_path"]


@case("flags: sampling a backbone that does not decode to images")
def _(ws, tmp):
    return _sample(ws, tmp, backbone="g"), ["backbone gmm", "not RGB images"]


@case("flags: resuming into a folder of another run")
def _(ws, tmp):
    out = tmp / "out"
    assert cli_main([str(a) for a in _sample(ws, tmp)]) == 0  # NFE 4 images
    return _sample(ws, tmp, solver=("--solver", "euler", "--nfe", "6")), ["000000.json", "num_points: 5",
                                                                           "this run: 7", "another --outdir"]


# ---------------------------------------------------------------------------------------------- the test
@pytest.mark.parametrize("name", list(CASES))
def test_malformed_input_is_a_clear_error(name, ws, refs, tmp_path, capsys):
    build = CASES[name]
    argv, must = build(ws, tmp_path, refs) if getattr(build, "needs_refs", False) else build(ws, tmp_path)
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in out.iterdir()} if out.is_dir() else {}
    rc = cli_main([str(a) for a in argv])
    err = capsys.readouterr().err
    if os.environ.get("EPD_SHOW_ERRORS"):
        with capsys.disabled():
            print(f"\n[{name}] {err.strip().splitlines()[-1] if err.strip() else err}")
    assert rc == 2, f"exit {rc}\n{err[-3000:]}"
    assert "Traceback" not in err and err.count("error:") == 1, err
    for m in must:
        assert m in err, f"message does not name {m!r}: {err}"
    after = {p.name: p.read_bytes() for p in visible_files(out)} if out.is_dir() else {}
    assert after == before, f"files were written: {sorted(set(after) - set(before))}"


def test_enough_cases():
    assert len(CASES) >= 30


# ---------------------------------------------------------------------------------------------- controls
def test_crlf_bom_prompt_file_is_read_cleanly(ws, tmp_path, capsys):
    f = _prompt_file(tmp_path, "p.txt", "\ufeffseven\r\ndigit 3\r\n\r\n".encode())
    out = tmp_path / "out"
    assert cli_main([str(a) for a in _sample(ws, tmp_path, extra=("--prompt-file", f))]) == 0
    prompts = [json.loads((out / f"{s:06d}.json").read_text())["prompt"] for s in range(4)]
    assert prompts == ["seven", "digit 3", "seven", "digit 3"]
    csv_f = _prompt_file(tmp_path, "p.csv", "\ufeffid,caption\r\n0,seven\r\n1,\"digit 3\"\r\n".encode())
    from epd.io import read_prompts

    assert read_prompts(csv_f) == ["seven", "digit 3"]


def test_hidden_folders_and_stray_files_are_skipped(ws, refs, tmp_path):
    d = _images(tmp_path, refs)
    (d / ".ipynb_checkpoints").mkdir()
    (d / ".ipynb_checkpoints" / "000000-checkpoint.png").write_bytes(b"junk")
    (d / ".000001.png.tmp").write_bytes(b"junk")
    (d / "notes.txt").write_text("not an image")
    assert cli_main([str(a) for a in _evaluate(ws, tmp_path, d)]) == 0
    rows = (tmp_path / "out" / "scores.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == [f"{i:06d}.png" for i in range(4)]


def test_rmse_vs_teacher_alone(tmp_path, refs):
    """Regression: ``--metrics rmse_vs_teacher`` alone used to crash (IndexError) while building the summary."""
    from safetensors.torch import save_file

    d = _images(tmp_path, refs)
    save_file({"seeds": torch.arange(4), "latents": torch.zeros(4, 1, 8, 8)}, str(d / "latents.safetensors"))
    save_file({"seeds": torch.arange(4), "latents": torch.full((4, 1, 8, 8), 2.0)}, str(tmp_path / "ref.safetensors"))
    assert cli_main(["evaluate", "--images", str(d), "--metrics", "rmse_vs_teacher", "--reference-latents",
                     str(tmp_path / "ref.safetensors"), "--out-dir", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["metrics"]["rmse_vs_teacher"]["mean"] == pytest.approx(2.0)


def test_resuming_a_distillation_with_other_settings_is_refused(tmp_path):
    """A checkpoint records what it was made for; resuming it with another learning rate or teacher set would
    silently mix two runs."""
    from epd.backbones.gmm import GMMBackbone, make_gmm
    from epd.distill import DistillConfig, distill
    from epd.errors import ConfigError
    from epd.study import load_teacher, teacher_sigmas
    from epd.teacher import generate

    bb = GMMBackbone(make_gmm(dim=4, num_classes=2, per_class=1, seed=3))
    generate(bb, prompts=["0", "1"], seeds=list(range(32)), num_points=4, M=1, solver="heun", out_dir=tmp_path / "t")
    student, _ = teacher_sigmas(bb, 4, 0)
    man, x, s = load_teacher(tmp_path / "t", student)

    def run(lr=0.05, x_init=x, iterations=4):
        return distill(bb, sigmas=student, x_init=x_init, targets=s, prompts=man["prompts"], num_points=2, afs=True,
                       cfg=DistillConfig(iterations=iterations, batch=8, lr=lr, save_every=2), out_dir=tmp_path / "d")

    first = run(iterations=2)
    for kw in ({"lr": 0.01}, {"x_init": x + 1e-3}):
        with pytest.raises(ConfigError, match=r"checkpoint\.pt: was written for other distillation settings"):
            run(**kw, iterations=2)
    assert run(iterations=2).equal(first)  # same settings: resumes (nothing left to do) to the same table
