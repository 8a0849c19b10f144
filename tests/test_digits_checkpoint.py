"""Digits model files: save/load round trip and a clear error, naming the file, for each kind of damage."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from epd.backbones.digits import FORMAT, DigitsBackbone, build_net, load_model, save_model
from epd.backbones.digits.classifier import DigitsClassifier, DigitsClassifierConfig, load_classifier, save_classifier
from epd.errors import EPDError

ARCH = {"resolution": 8, "channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention": True,
        "emb_dim": 16, "dropout": 0.0}


def _write(tmp_path, arch=ARCH, seed=0):
    torch.manual_seed(seed)
    net = build_net(arch)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    save_model(tmp_path, net, {"format": FORMAT, "version": 1, "arch": arch})
    return net


def test_round_trip_gives_identical_outputs(tmp_path):
    net = _write(tmp_path)
    loaded, meta = load_model(tmp_path)
    assert meta["arch"] == ARCH and len(meta["sha256"]) == 64
    x, s, y = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 1.0, 10.0]), torch.tensor([0, 5, 10])
    with torch.no_grad():
        assert torch.equal(loaded(x, s, y), net.eval()(x, s, y))
    bb = DigitsBackbone.load(tmp_path, guidance=1.5)
    assert bb.guidance == 1.5 and bb.resolution == 8


def test_truncated_file(tmp_path):
    _write(tmp_path)
    st = tmp_path / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(EPDError, match=r"model\.safetensors: cannot read safetensors .*truncated or corrupt"):
        load_model(tmp_path)


def test_wrong_shapes(tmp_path):
    _write(tmp_path, {**ARCH, "channels": 16})
    js = tmp_path / "model.json"
    meta = json.loads(js.read_text())
    meta["arch"] = ARCH  # the JSON now describes a narrower net than the tensors hold
    js.write_text(json.dumps(meta))
    with pytest.raises(EPDError, match=r"model\.safetensors: tensor shapes do not match .*model\.json.*conv_in"):
        load_model(tmp_path)


def test_missing_keys(tmp_path):
    _write(tmp_path)
    st = tmp_path / "model.safetensors"
    state = load_file(str(st))
    del state["net.conv_out.weight"]
    save_file(state, str(st))
    with pytest.raises(EPDError, match=r"model\.safetensors: does not match .*missing keys \['net\.conv_out\.weight'\]"):
        load_model(tmp_path)


def test_mismatched_pair(tmp_path):
    _write(tmp_path / "a", seed=0)
    _write(tmp_path / "b", seed=1)
    (tmp_path / "b" / "model.safetensors").replace(tmp_path / "a" / "model.safetensors")
    with pytest.raises(EPDError, match=r"content does not match .*sha256"):
        load_model(tmp_path / "a")


def test_bad_or_missing_json(tmp_path):
    with pytest.raises(EPDError, match=r"model\.json: not found; train the backbone first"):
        load_model(tmp_path)
    _write(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(EPDError, match=r"model\.json: not valid JSON"):
        load_model(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(EPDError, match="format 'something-else'"):
        load_model(tmp_path)


def test_missing_weights_file(tmp_path):
    _write(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(EPDError, match=r"model\.safetensors: not found"):
        load_model(tmp_path)


def test_classifier_round_trip_and_corruption(tmp_path):
    cfg = DigitsClassifierConfig(hidden=[16, 8])
    torch.manual_seed(0)
    clf = DigitsClassifier(cfg.hidden, cfg.dropout)
    save_classifier(tmp_path, clf, cfg, {"heldout_accuracy": 0.5})
    loaded, meta = load_classifier(tmp_path)
    x = torch.rand(4, 3, 8, 8)
    assert torch.equal(loaded.read(x)[1], clf.eval().read(x)[1])
    assert meta["train"]["hidden"] == [16, 8]
    st = tmp_path / "classifier.safetensors"
    st.write_bytes(st.read_bytes()[:100])
    with pytest.raises(EPDError, match=r"classifier\.safetensors: cannot read safetensors"):
        load_classifier(tmp_path)
