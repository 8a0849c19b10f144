"""Bad weights stop a real-backbone study in ``epd backbone check``, its first job, before any GPU work.

Each case is a tiny ``epd weights fake`` root spoiled one way; the check must exit 2 with one error naming the file
or key, and write no output: an incomplete folder, a folder of another family, a scorer checkpoint of the wrong
shape, a resolution the backbone does not support.
"""

import shutil
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("diffusers")
pytest.importorskip("open_clip")
pytest.importorskip("ImageReward")

from epd.backbones.weights import REGISTRY  # noqa: E402
from epd.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake") / "weights"
    assert main(["weights", "fake", "--out", str(root), "--size", "tiny", "--backbones", "sd3"]) == 0
    return root


@pytest.fixture
def spoil(tiny, tmp_path, monkeypatch):
    """A private copy of the tiny root as the only place weights resolve from; returns (root, check)."""
    root = tmp_path / "weights"
    shutil.copytree(tiny, root)
    for var in [s.env for s in REGISTRY.values() if s.env] + ["HF_HUB_CACHE"]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("EPD_DATA_DIR", str(tmp_path / "no-data"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-hf"))
    monkeypatch.setenv("EPD_WEIGHTS_DIR", str(root))
    cfg = yaml.safe_load((ROOT / "configs" / "smoke_sd3.yaml").read_text())
    cfg["run"]["weights_dir"] = str(root)
    name = next(iter(cfg["backbones"]))

    def check(**section):
        cfg["backbones"][name].update(section)
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg))
        out = tmp_path / "check.json"
        rc = main(["backbone", "check", "--config", str(path), "--backbone", name, "--out", str(out)])
        return rc, out

    return root, check


def test_the_unspoilt_root_passes(spoil):
    _, check = spoil
    rc, out = check()
    assert rc == 0 and out.is_file()


def test_incomplete_folder_names_the_missing_file(spoil, capsys):
    root, check = spoil
    folder = next(p for p in root.iterdir() if (p / "model_index.json").is_file())
    victim = next((folder / "transformer").glob("*.safetensors"))
    victim.unlink()
    rc, out = check()
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert "transformer" in err and err.count("error:") == 1


def test_folder_of_another_family_names_the_pipeline_class(spoil, capsys):
    root, check = spoil
    folder = next(p for p in root.iterdir() if (p / "model_index.json").is_file())
    index = (folder / "model_index.json")
    index.write_text(index.read_text().replace("StableDiffusion3Pipeline", "FluxPipeline"))
    rc, out = check()
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert "FluxPipeline" in err and "StableDiffusion3Pipeline" in err


def test_scorer_checkpoint_of_the_wrong_shape_names_the_file(spoil, capsys):
    root, check = spoil
    ckpt = root / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth"
    sd = torch.load(ckpt, weights_only=True)
    key = next(k for k, v in sd.items() if v.ndim == 2)
    sd[key] = torch.zeros(sd[key].shape[0] + 1, sd[key].shape[1])
    torch.save(sd, ckpt)
    rc, out = check(metrics=["aesthetic"])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert str(ckpt) in err and "shape" in err


def test_unsupported_resolution_names_the_key(spoil, capsys):
    _, check = spoil
    rc, out = check(resolution=640)
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert "640" in err and "resolution" in err
