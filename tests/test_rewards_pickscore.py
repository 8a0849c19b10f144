"""PickScore parity: our registry scorer vs the PickScore_v1 model card's formula run with transformers directly.

There is no PickScore package; the model card's ``calc_probs`` code (``AutoProcessor`` + ``AutoModel``,
``get_image_features``/``get_text_features``, unit-normalise, ``logit_scale.exp() * text @ image.T``) is the
reference, executed here on a tiny random ``CLIPModel`` saved to a local folder.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))
from _tiny_tokenizers import build_clip_processor  # noqa: E402

from epd.errors import EPDError  # noqa: E402
from epd.rewards import get_scorer  # noqa: E402

PROMPTS = ["a photo of an astronaut riding a horse", "a red car", "an oil painting of a cat on a table, detailed"]


def tiny_clip_config(image_size=224, patch=32, proj=16):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(image_size=image_size, patch_size=patch, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=proj,
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import CLIPModel

    root = tmp_path_factory.mktemp("pick")
    wdir = root / "weights"
    torch.manual_seed(0)
    CLIPModel(tiny_clip_config()).save_pretrained(wdir / "pickscore" / "PickScore_v1")
    build_clip_processor(wdir / "pickscore" / "processor", 224)
    rng = np.random.default_rng(1)
    imgs = []
    for size in [(256, 256), (320, 240), (224, 300)]:
        imgs.append(Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)))
    return wdir, imgs


def reference_pickscore(proc_dir, model_dir, prompt, images):
    """The model card's calc_probs, minus the softmax (the raw scores are what the original reports)."""
    from transformers import AutoModel, AutoProcessor

    processor = AutoProcessor.from_pretrained(proc_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    image_inputs = processor(images=images, padding=True, truncation=True, max_length=77, return_tensors="pt")
    text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        image_embs = model.get_image_features(**image_inputs)
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        text_embs = model.get_text_features(**text_inputs)
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
        scores = model.logit_scale.exp() * (text_embs @ image_embs.T)[0]
    return scores.numpy()


def test_pickscore_matches_model_card(setup):
    wdir, imgs = setup
    scorer = get_scorer("pickscore", weights_dir=wdir, batch_size=2)
    tensors = [torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in imgs]
    ours = scorer(tensors, PROMPTS).numpy()
    ref = np.array([reference_pickscore(wdir / "pickscore" / "processor", wdir / "pickscore" / "PickScore_v1", p, [im])[0]
                    for p, im in zip(PROMPTS, imgs)])
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    # one prompt, several images, as the model card scores them
    ref_all = reference_pickscore(wdir / "pickscore" / "processor", wdir / "pickscore" / "PickScore_v1", PROMPTS[0], imgs)
    np.testing.assert_allclose(scorer(tensors, [PROMPTS[0]] * 3).numpy(), ref_all, rtol=1e-5, atol=1e-6)
    assert not np.allclose(ours, ref_all)


def test_pickscore_wrong_folder(setup, tmp_path):
    wdir, _ = setup
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16)).save_pretrained(tmp_path / "bert")
    paths = {"pickscore": str(tmp_path / "bert"), "pickscore_processor": str(wdir / "pickscore" / "processor")}
    with pytest.raises(EPDError, match="expected 'clip'|not a transformers CLIP model"):
        get_scorer("pickscore", paths=paths)
