"""Registry: names, lazy factories, weight checks before loading, `epd metrics list`."""

import subprocess
import sys

import pytest

from epd.backbones.weights import MissingWeightsError
from epd.cli import main
from epd.errors import EPDError
from epd.rewards import get_scorer, list_scorers, register, required_weights, resolve_weights, scorer_kind

EXPECTED = ["hps", "pickscore", "imagereward", "imagereward_rlepd", "clip", "clip100", "aesthetic", "mps",
            "fid_clean", "digits_alignment", "digits_realism", "digits_typicality", "digits_accuracy", "digits_fd"]


def test_names_kinds_and_weights():
    assert [n for n, _ in list_scorers()] == EXPECTED
    assert scorer_kind("fid_clean") == "set" and scorer_kind("digits_fd") == "set" and scorer_kind("hps") == "image"
    assert required_weights("aesthetic") == [("scorer", "clip_l14"), ("scorer", "aesthetic")]
    assert required_weights("imagereward_rlepd") == required_weights("imagereward")
    assert required_weights("fid_clean") == [("scorer", "inception")]
    with pytest.raises(EPDError, match="unknown metric 'hpsv3'"):
        required_weights("hpsv3")
    with pytest.raises(ValueError, match="module:function"):
        register("x", "no_colon", "d")


def test_import_is_light():
    code = ("import sys, epd.rewards, epd.metrics.results, epd.evaluate; "
            "print([m for m in ('torch', 'open_clip', 'transformers', 'ImageReward', 'clip') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_missing_weights_listed_together(tmp_path, monkeypatch):
    monkeypatch.setenv("EPD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("EPD_WEIGHTS_DIR", raising=False)
    for v in ("HPS_WEIGHTS", "MPS_WEIGHTS", "MPS_PROCESSOR_PATH"):
        monkeypatch.delenv(v, raising=False)
    with pytest.raises(MissingWeightsError) as e:
        resolve_weights(["hps", "mps"], weights_dir=tmp_path / "w")
    msg = str(e.value)
    for part in (str(tmp_path / "w" / "hps" / "HPS_v2.1_compressed.pt"), "mps/MPS_overall_state_dict.pt",
                 "mps/processor", "HPS_WEIGHTS"):
        assert part in msg
    assert "dvc pull" not in msg  # data.dvc tracks no scorer weights
    with pytest.raises(MissingWeightsError):
        get_scorer("hps")


def test_explicit_paths_win(tmp_path, monkeypatch):
    f = tmp_path / "my_hps.pt"
    f.write_bytes(b"x")
    monkeypatch.setenv("EPD_WEIGHTS_DIR", str(tmp_path / "elsewhere"))
    assert resolve_weights("hps", paths={"hps": str(f)}) == {"hps": f}


def test_metrics_list_cli(capsys):
    assert main(["metrics", "list"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines()]
    assert names == EXPECTED
    assert "fid" in out.lower() and "+3*1.03334" in out


def test_dvc_hint_only_for_files_dvc_tracks(tmp_path, monkeypatch):
    from epd.backbones import weights as W

    tracked = W.dvc_tracked()  # the repository's real listing of data.dvc
    assert "checkpoints/digits/backbone/model.safetensors" in tracked
    assert not any(t.startswith("weights/") for t in tracked)
    monkeypatch.setenv("EPD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("EPD_WEIGHTS_DIR", raising=False)
    monkeypatch.delenv("HPS_WEIGHTS", raising=False)
    monkeypatch.setattr(W, "dvc_tracked", lambda: {"weights/hps/HPS_v2.1_compressed.pt"})
    with pytest.raises(MissingWeightsError) as e:
        resolve_weights(["hps", "mps"])
    msg = str(e.value)
    assert "DVC tracks hps/HPS_v2.1_compressed.pt: dvc pull data.dvc" in msg
    assert "mps/MPS_overall_state_dict.pt" in msg.split("DVC tracks")[0] and "mps" not in msg.split("DVC tracks")[1]
