"""ImageReward parity: our registry scorer vs the ``image-reward`` package's own ``score``/``inference_rank``.

The package is the reference (installed, works with transformers 4.55.4). Offline it cannot fetch
``bert-base-uncased`` or the ViT-L checkpoint, so the test patches exactly two construction hooks of the package
(``init_tokenizer`` -> a local WordPiece vocab, ``create_vit`` -> a tiny ViT) and loads a random checkpoint
through the package's ``ImageReward.load(local.pt, med_config=local.json)``. The text encoder is shrunk through
``med_config.json`` (1 layer); its width stays 768 because the package hard-codes ``MLP(768)``.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

RM = pytest.importorskip("ImageReward")
sys.path.insert(0, str(Path(__file__).parent))
from _tiny_tokenizers import bert_vocab_dir  # noqa: E402

from epd.errors import EPDError  # noqa: E402
from epd.rewards import IMAGEREWARD_RLEPD_OFFSET, get_scorer  # noqa: E402

VIT = dict(img_size=224, patch_size=16, embed_dim=128, depth=1, num_heads=2)  # heads = 128 // 64
MED = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 256,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 12,
    "num_hidden_layers": 1, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 200, "encoder_width": 768,
    "add_cross_attention": True,
}
PROMPTS = ["a photo of an astronaut riding a horse on the moon", "a red car", "a cute cat sitting on a table"]


@pytest.fixture
def package_hooks(monkeypatch):
    """Point the package's two download-bound constructors at local, tiny equivalents."""
    import ImageReward.models.BLIP.blip_pretrain as bp
    from ImageReward.models.BLIP.vit import VisionTransformer
    from transformers import BertTokenizer

    def init_tokenizer():  # same as ImageReward.models.BLIP.blip.init_tokenizer, local vocab
        tokenizer = BertTokenizer.from_pretrained(str(bert_vocab_dir()))
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tokenizer.enc_token_id = tokenizer.additional_special_tokens_ids[0]
        return tokenizer

    monkeypatch.setattr(bp, "init_tokenizer", init_tokenizer)
    monkeypatch.setattr(bp, "create_vit", lambda *a, **k: (VisionTransformer(**VIT), VIT["embed_dim"]))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    import shutil

    import ImageReward.models.BLIP.blip_pretrain as bp
    from ImageReward.ImageReward import ImageReward as IRModel
    from ImageReward.models.BLIP.vit import VisionTransformer

    root = tmp_path_factory.mktemp("ir")
    wdir = root / "weights"
    d = wdir / "imagereward"
    d.mkdir(parents=True)
    (d / "med_config.json").write_text(json.dumps(MED))
    shutil.copytree(bert_vocab_dir(), d / "bert-base-uncased")
    old = bp.create_vit, bp.init_tokenizer
    bp.create_vit = lambda *a, **k: (VisionTransformer(**VIT), VIT["embed_dim"])
    bp.init_tokenizer = lambda: None
    try:
        torch.manual_seed(0)
        model = IRModel(med_config=str(d / "med_config.json"))
    finally:
        bp.create_vit, bp.init_tokenizer = old
    for n, p in model.mlp.named_parameters():  # default init: outputs ~0; spread them
        torch.nn.init.normal_(p, std=0.1)
    torch.save(model.state_dict(), d / "ImageReward.pt")
    rng = np.random.default_rng(3)
    paths = []
    for i, size in enumerate([(256, 256), (300, 224), (224, 260)]):
        p = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return wdir, paths


def tensors(paths):
    return [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 255 for p in paths]


def test_imagereward_matches_package(weights, package_hooks):
    wdir, paths = weights
    d = wdir / "imagereward"
    ref_model = RM.load(str(d / "ImageReward.pt"), device="cpu", med_config=str(d / "med_config.json"))
    with torch.no_grad():
        ref = np.array([ref_model.score(t, str(p)) for t, p in zip(PROMPTS, paths)])
        _, ref_rank = ref_model.inference_rank(PROMPTS[0], [str(p) for p in paths])
    scorer = get_scorer("imagereward", weights_dir=wdir, batch_size=2)
    ours = scorer(tensors(paths), PROMPTS).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scorer(tensors(paths), [PROMPTS[0]] * 3).numpy(), ref_rank, rtol=1e-5, atol=1e-6)
    assert np.ptp(ours) > 1e-3


def test_rlepd_convention_is_official_plus_three_sigma(weights):
    wdir, paths = weights
    official = get_scorer("imagereward", weights_dir=wdir)(tensors(paths), PROMPTS).numpy()
    rlepd = get_scorer("imagereward_rlepd", weights_dir=wdir)(tensors(paths), PROMPTS).numpy()
    np.testing.assert_allclose(rlepd - official, 3 * 1.03334, atol=2e-5)
    np.testing.assert_allclose(rlepd - official, IMAGEREWARD_RLEPD_OFFSET, atol=1e-9)
    assert abs(IMAGEREWARD_RLEPD_OFFSET - 3.1000) < 1e-4  # spec: repo 3.1121 <-> paper 0.0121


def test_wrong_or_broken_files(weights, tmp_path):
    import shutil

    wdir, _ = weights
    shutil.copytree(wdir, tmp_path / "w")
    pt = tmp_path / "w" / "imagereward" / "ImageReward.pt"
    sd = torch.load(pt)
    del sd["mlp.layers.0.weight"]
    torch.save(sd, pt)
    with pytest.raises(EPDError, match="does not hold a ImageReward-v1.0 checkpoint.*mlp.layers.0.weight"):
        get_scorer("imagereward", weights_dir=tmp_path / "w")
    torch.save({"layers.0.weight": torch.zeros(2, 2)}, pt)  # an aesthetic MLP, not ImageReward
    with pytest.raises(EPDError, match="not an ImageReward checkpoint"):
        get_scorer("imagereward", weights_dir=tmp_path / "w")
