"""`epd predictor show` and `epd predictor convert` on the original system's released tables: the full provenance
(as JSON, equal to what `load` gives), the guidance text, the step rows equal to the torch-loaded table's, folders of
any `.pkl`/`.safetensors` names (several: exit 2 listing them), and `convert`'s folder creation and --force."""

import json
import shutil
import sys
from pathlib import Path

import pytest

from epd.cli import main
from epd.predictor import load, save

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import FIXTURES, needs  # noqa: E402

pytestmark = needs("rlepd/best_models/sd15", "iccv/00001-cifar10-3-3-epd-uni1.0-afs/network-snapshot-000010.pkl")
SD15 = FIXTURES / "rlepd/best_models/sd15"
BEST = SD15 / "sd15-best.pkl"
CIFAR = FIXTURES / "iccv/00001-cifar10-3-3-epd-uni1.0-afs/network-snapshot-000010.pkl"


def _show(path, capsys) -> tuple[int, str, str]:
    rc = main(["predictor", "show", str(path)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _provenance(text: str) -> dict:
    return json.loads(text[text.index("  provenance:\n") + len("  provenance:\n"):])


def _rows(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("  step ")]


@pytest.mark.parametrize("path", [BEST, CIFAR], ids=["sd15", "cifar"])
def test_show_prints_the_whole_provenance(path, capsys):
    rc, out, _ = _show(path, capsys)
    table = load(path)
    assert rc == 0
    assert _provenance(out) == json.loads(json.dumps(table.provenance))   # nothing cut, every number whole
    assert _rows(out) == _rows(table.summary())                           # numpy display == torch-loaded table


def test_show_guidance_text(capsys):
    assert "guidance=cfg (scale 7.5)" in _show(BEST, capsys)[1]
    out = _show(CIFAR, capsys)[1]                                          # unconditional: type None, rate 0.0
    assert "guidance=none" in out and "None:0.0" not in out


def test_show_native_snapshot_equals_pickle(tmp_path, capsys):
    native = save(load(BEST), tmp_path / "t")
    a, b = _show(BEST, capsys)[1], _show(native, capsys)[1]
    assert _rows(a) == _rows(b) and _provenance(a) == _provenance(b)


def test_folder_with_one_snapshot_of_any_name(tmp_path, capsys):
    shutil.copy(BEST, tmp_path / "my table (best).pkl")
    rc, out, _ = _show(tmp_path, capsys)
    assert rc == 0 and _rows(out) == _rows(_show(BEST, capsys)[1])
    native = tmp_path / "n"
    native.mkdir()
    save(load(BEST), native / "whatever")
    rc, out, _ = _show(native, capsys)
    assert rc == 0 and _rows(out) == _rows(_show(BEST, capsys)[1])


def test_folder_with_several_snapshots_asks_for_one(capsys):
    rc, out, err = _show(SD15, capsys)                 # the original's exps/best_models/sd15: start, distilled, best
    assert rc == 2 and out == ""
    for name in ("sd15-best.pkl", "sd15-distilled.pkl", "sd15-start.pkl"):
        assert str(SD15 / name) in err
    assert "pass one of them" in err


def test_convert_creates_missing_folders(tmp_path, capsys):
    dest = tmp_path / "a" / "b"
    assert main(["predictor", "convert", str(BEST), str(dest)]) == 0
    out = dest / "sd15-best.safetensors"
    assert load(out).equal(load(BEST)) and load(out).meta == load(BEST).meta


def test_convert_refuses_to_overwrite_without_force(tmp_path, capsys):
    assert main(["predictor", "convert", str(BEST), str(tmp_path / "t.safetensors")]) == 0
    before = (tmp_path / "t.safetensors").read_bytes(), (tmp_path / "t.json").read_bytes()
    capsys.readouterr()
    assert main(["predictor", "convert", str(SD15 / "sd15-start.pkl"), str(tmp_path / "t.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "--force" in err and str(tmp_path / "t.safetensors") in err
    assert ((tmp_path / "t.safetensors").read_bytes(), (tmp_path / "t.json").read_bytes()) == before
    assert main(["predictor", "convert", str(SD15 / "sd15-start.pkl"), str(tmp_path / "t.json"), "--force"]) == 0
    assert load(tmp_path / "t.safetensors").equal(load(SD15 / "sd15-start.pkl"))
