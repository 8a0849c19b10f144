"""Digits training: config parsing, determinism, resume == uninterrupted, checkpoint checks, CLI, MLflow."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
import yaml
from safetensors.torch import load_file

from epd.backbones.digits import load_model
from epd.backbones.digits.train import DigitsTrainConfig, load_train_config, train
from epd.cli import main as cli_main
from epd.errors import ConfigError, EPDError

TINY = {"steps": 6, "batch_size": 16, "checkpoint_every": 2, "log_every": 2, "eval_every": 3, "warmup": 2,
        "arch": {"channels": 8, "emb_dim": 16}, "classifier": {"steps": 20, "hidden": [16, 8]}}


def _cfg(**over) -> DigitsTrainConfig:
    return DigitsTrainConfig.from_dict({**TINY, **over})


def _tensors(d):
    return load_file(str(d / "model.safetensors"))


def _log(d):
    rows = [json.loads(line) for line in (d / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)



pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------- config
def test_config_rejects_unknown_keys_naming_them():
    with pytest.raises(ConfigError, match=r"backbones\.digits\.train\.stepz: unknown key"):
        DigitsTrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ConfigError, match=r"backbones\.digits\.train\.arch\.width: unknown key"):
        DigitsTrainConfig.from_dict({"arch": {"width": 3}})
    with pytest.raises(ConfigError, match=r"backbones\.digits\.train\.classifier\.depth: unknown key"):
        DigitsTrainConfig.from_dict({"classifier": {"depth": 3}})
    with pytest.raises(ConfigError, match="steps: expected a positive integer"):
        DigitsTrainConfig.from_dict({"steps": 0})


def test_yaml_loading(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"backbones": {"digits": {"kind": "digits", "guidance": 1.0, "train": TINY}}}))
    assert load_train_config(p) == _cfg()
    p.write_text(yaml.safe_dump({"backbones": {"sd15": {"kind": "sd15"}}}))
    with pytest.raises(ConfigError, match="no 'backbones.digits' section"):
        load_train_config(p)


def test_hash_ignores_cadence_only():
    assert _cfg().hash() == _cfg(log_every=1, checkpoint_every=5).hash()
    assert _cfg().hash() != _cfg(seed=1).hash()


# ---------------------------------------------------------------------- determinism and resume
def test_same_seed_same_model_and_samples(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    train(_cfg(), a, progress=False)
    train(_cfg(), b, progress=False)
    train(_cfg(seed=1), c, progress=False)
    assert _same(_tensors(a), _tensors(b))
    assert not _same(_tensors(a), _tensors(c))
    assert _log(a) == _log(b)
    assert load_file(str(a / "classifier.safetensors")).keys() == load_file(str(b / "classifier.safetensors")).keys()
    assert _same(load_file(str(a / "classifier.safetensors")), load_file(str(b / "classifier.safetensors")))
    from epd.backbones.digits import DigitsBackbone
    from epd.solvers import solve

    xs = []
    for d in (a, b):
        bb = DigitsBackbone.load(d, guidance=1.5)
        xs.append(solve("heun", bb.denoiser, bb.noise([0, 1, 2]), bb.sigmas(5), cond=bb.prepare(["1", "2", "3"])).x)
    assert torch.equal(xs[0], xs[1])


def test_resume_after_interrupt_equals_uninterrupted(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(_cfg(), full, progress=False)
    summary = train(_cfg(), cut, progress=False, stop_after=3)  # stops between checkpoints
    assert not summary["finished"]
    assert (cut / "checkpoint.safetensors").is_file() and not (cut / "model.safetensors").exists()
    summary = train(_cfg(), cut, progress=False)
    assert summary["finished"] and not (cut / "checkpoint.safetensors").exists()
    assert _same(_tensors(full), _tensors(cut))
    assert _log(full) == _log(cut)


def test_checkpoint_of_another_config_is_refused(tmp_path):
    train(_cfg(), tmp_path, progress=False, stop_after=2)
    with pytest.raises(EPDError, match=r"checkpoint\.safetensors: written for a different training config"):
        train(_cfg(lr=1e-4), tmp_path, progress=False)
    (tmp_path / "checkpoint.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(EPDError, match=r"checkpoint\.safetensors: cannot read the training checkpoint"):
        train(_cfg(), tmp_path, progress=False)


def test_finished_model_is_not_retrained(tmp_path):
    train(_cfg(), tmp_path, progress=False)
    before = (tmp_path / "model.safetensors").stat().st_mtime_ns
    train(_cfg(log_every=3), tmp_path, progress=False)  # cadence change: same model
    assert (tmp_path / "model.safetensors").stat().st_mtime_ns == before
    train(_cfg(steps=4), tmp_path, progress=False)
    assert json.loads((tmp_path / "model.json").read_text())["steps"] == 4


# ---------------------------------------------------------------------- CLI and tracking
def test_cli_train_and_errors(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"backbones": {"digits": {"kind": "digits", "train": TINY}}}))
    out = tmp_path / "out"
    assert cli_main(["backbone", "train", "--config", str(cfg), "--out", str(out), "--steps", "4",
                     "--no-progress"]) == 0
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "model.json", "classifier.safetensors",
                                                "classifier.json", "train_log.jsonl", "resolved_config.yaml"}
    assert load_model(out)[1]["train"]["steps"] == 4
    cfg.write_text(yaml.safe_dump({"backbones": {"digits": {"kind": "digits", "train": {"lr_max": 1}}}}))
    assert cli_main(["backbone", "train", "--config", str(cfg), "--out", str(out)]) == 2
    assert "backbones.digits.train.lr_max: unknown key" in capsys.readouterr().err


def test_mlflow_logging(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    train(_cfg(), tmp_path / "out", progress=False)
    runs = mlflow.search_runs(experiment_names=["epd/backbone"])
    assert len(runs) == 1
    assert runs.loc[0, "params.steps"] == "6" and runs.loc[0, "params.arch.channels"] == "8"
    hist = mlflow.MlflowClient().get_metric_history(runs.loc[0, "run_id"], "loss")
    assert [m.step for m in hist] == [2, 4, 6]
    assert asdict(_cfg())["steps"] == 6
