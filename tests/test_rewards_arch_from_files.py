"""Scorer loaders read the architecture from the weights files (or a config beside them), falling back to the
released architecture: the default path still builds the full models (checked on names, configs and meta-device
modules, never instantiating them), and other sizes load with no extra argument."""

import json
import tempfile
from pathlib import Path

import pytest
import torch

from epd.rewards import get_scorer


# ---------------------------------------------------------------------- HPS: open_clip_config.json beside the file
def test_hps_default_is_vit_h_14_without_a_config(tmp_path, monkeypatch):
    open_clip = pytest.importorskip("open_clip")
    from epd.rewards import hps

    ckpt = tmp_path / "hps" / "HPS_v2.1_compressed.pt"
    ckpt.parent.mkdir()
    torch.save({"state_dict": {"logit_scale": torch.zeros(())}}, ckpt)
    assert hps.hps_architecture(ckpt) == "ViT-H-14" == hps.DEFAULT_ARCH
    cfg = open_clip.get_model_config("ViT-H-14")
    assert (cfg["embed_dim"], cfg["vision_cfg"]["width"], cfg["vision_cfg"]["layers"], cfg["text_cfg"]["width"],
            cfg["text_cfg"]["layers"]) == (1024, 1280, 32, 1024, 24)
    seen = []

    def no_build(name, **kw):  # the real loader's call, stopped before a 986M-parameter model is allocated
        seen.append((name, kw))
        raise StopIteration

    monkeypatch.setattr(open_clip, "create_model_and_transforms", no_build)
    with pytest.raises(StopIteration):
        get_scorer("hps", weights_dir=tmp_path)
    assert seen == [("ViT-H-14", {"pretrained": None, "output_dict": True, "load_weights": False})]


def test_hps_builds_the_architecture_of_its_config(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    from epd.rewards import hps

    model_cfg = {"embed_dim": 8, "vision_cfg": {"image_size": 64, "layers": 1, "width": 16, "patch_size": 32,
                                                "head_width": 8},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 8, "heads": 1, "layers": 1}}
    d = tmp_path / "hps"
    d.mkdir()
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    torch.manual_seed(0)
    ref = open_clip.CLIP(**model_cfg)
    torch.save({"state_dict": ref.state_dict()}, d / "HPS_v2.1_compressed.pt")
    assert hps.hps_architecture(d / "HPS_v2.1_compressed.pt") == f"local-dir:{d}"
    assert hps.hps_architecture(d / "HPS_v2.1_compressed.pt", "ViT-B-32") == "ViT-B-32"  # explicit wins
    scorer = get_scorer("hps", weights_dir=tmp_path)
    assert scorer.model.visual.conv1.weight.shape == (16, 3, 32, 32)
    assert torch.equal(scorer.model.token_embedding.weight, ref.token_embedding.weight)
    s = scorer(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)), ["a cat", "a dog"])
    assert torch.isfinite(s).all()
    (d / "open_clip_config.json").write_text("{not json")
    with pytest.raises(Exception, match="open_clip"):
        get_scorer("hps", weights_dir=tmp_path)


# ---------------------------------------------------------------------- ImageReward: MLP width from the state dict
# BLIP's med_config.json as ImageReward-v1.0 ships it (BERT-base with cross-attention).
RELEASE_MED = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
               "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
               "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert",
               "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2,
               "vocab_size": 30524, "encoder_width": 768, "add_cross_attention": True}
VIT_L16 = dict(embed_dim=1024, depth=24, patch_size=16, img_size=224, num_heads=16, mlp_ratio=4.0)


def test_imagereward_head_width_from_the_state_dict():
    pytest.importorskip("ImageReward")
    from accelerate import init_empty_weights

    from epd.rewards import imagereward as ir
    from epd.tiny_tokenizers import build_bert_vocab

    assert ir.mlp_width_from_state_dict({}) == ir.RELEASE_MLP_WIDTH == 768
    assert ir.mlp_width_from_state_dict({"mlp.layers.0.weight": torch.zeros(1024, 32)}) == 32
    with tempfile.TemporaryDirectory() as tmp, init_empty_weights():  # the release's size, meta device: no memory
        med = Path(tmp) / "med_config.json"
        med.write_text(json.dumps(RELEASE_MED))
        bert = build_bert_vocab(Path(tmp) / "bert")
        full = ir.build_imagereward_model(med, bert, VIT_L16)
        small = ir.build_imagereward_model(med, bert, dict(VIT_L16, depth=1), mlp_width=32)
    assert full.mlp.input_size == 768 and full.mlp.layers[0].weight.shape == (1024, 768)
    assert full.blip.text_encoder.config.hidden_size == 768 and len(full.blip.visual_encoder.blocks) == 24
    assert full.blip.visual_encoder.patch_embed.proj.weight.shape == (1024, 3, 16, 16)
    assert small.mlp.input_size == 32 and small.mlp.layers[0].weight.shape == (1024, 32)


# ---------------------------------------------------------------------- MPS: config.json in the processor folder
def test_mps_default_clip_config_is_vit_h_14(tmp_path):
    pytest.importorskip("transformers")
    from epd.rewards.mps import _clip_config

    cfg = _clip_config(tmp_path)  # no config.json: the laion CLIP-ViT-H-14 architecture
    assert (cfg.projection_dim, cfg.vision_config.hidden_size, cfg.vision_config.num_hidden_layers,
            cfg.vision_config.patch_size, cfg.text_config.hidden_size, cfg.text_config.num_hidden_layers) == \
        (1024, 1280, 32, 14, 1024, 24)
    small = cfg.to_dict()
    small["vision_config"]["num_hidden_layers"] = 1
    (tmp_path / "config.json").write_text(json.dumps(small))
    assert _clip_config(tmp_path).vision_config.num_hidden_layers == 1


# ---------------------------------------------------------------------- aesthetic: input width from layers.0.weight
def test_aesthetic_width_from_the_state_dict():
    from epd.rewards.aesthetic import AestheticMLP

    assert AestheticMLP().input_size == 768  # ViT-L/14's embedding, the release
    src = AestheticMLP(16).state_dict()
    assert src["layers.0.weight"].shape == (1024, 16)
