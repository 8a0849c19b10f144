"""HPSv2.1 parity: our registry scorer vs hpsv2's scoring formula on identical tiny weights.

The ``hpsv2`` package itself cannot be used here: its wheel lacks ``bpe_simple_vocab_16e6.txt.gz`` and its
``score`` always downloads the laion2B ViT-H-14 base weights, even with a local checkpoint (no network in CI).
The reference below is therefore a line-by-line transcription of ``hpsv2.img_score.score`` (open_clip
``create_model_and_transforms`` + ``load_state_dict(ckpt['state_dict'])`` + ``preprocess_val(Image.open(path))``
+ ``tokenizer([prompt])`` + ``diag(image_features @ text_features.T)``), run one image at a time as hpsv2 does.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

open_clip = pytest.importorskip("open_clip")

from epd.errors import EPDError  # noqa: E402
from epd.rewards import get_scorer  # noqa: E402

TINY = "epd-tiny-hps-ViT"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
PROMPTS = ["a photo of an astronaut riding a horse", "a red car in the snow", "an oil painting of a cat"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hps")
    cfg = root / f"{TINY}.json"
    cfg.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY, pretrained=None)
    with torch.no_grad():  # make the score sensitive to the text and the image
        model.logit_scale.fill_(np.log(100.0))
    wdir = root / "weights"
    (wdir / "hps").mkdir(parents=True)
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, wdir / "hps" / "HPS_v2.1_compressed.pt")
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(256, 256), (300, 240), (224, 224)]):
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        arr[: size[1] // 2] //= (i + 2)  # some structure
        p = root / f"img{i}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return wdir, paths


def reference_hps(ckpt_path, img_path, prompt):
    """Transcription of hpsv2.img_score.score for one image (CPU, so autocast is a no-op there)."""
    model, _, preprocess_val = open_clip.create_model_and_transforms(TINY, pretrained=None, output_dict=True)
    checkpoint = torch.load(ckpt_path, map_location="cpu")
    model.load_state_dict(checkpoint["state_dict"])
    tokenizer = open_clip.get_tokenizer(TINY)
    model.eval()
    image = preprocess_val(Image.open(img_path)).unsqueeze(0)
    text = tokenizer([prompt])
    with torch.no_grad():
        outputs = model(image, text)
        image_features, text_features = outputs["image_features"], outputs["text_features"]
        logits_per_image = image_features @ text_features.T
        return torch.diagonal(logits_per_image).cpu().numpy()[0]


def load_tensor(p):
    return torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 255


def test_hps_matches_hpsv2_formula(setup):
    wdir, paths = setup
    scorer = get_scorer("hps", weights_dir=wdir, model_name=TINY, batch_size=2)
    ours = scorer([load_tensor(p) for p in paths], PROMPTS).numpy()
    ref = np.array([reference_hps(wdir / "hps" / "HPS_v2.1_compressed.pt", p, t) for p, t in zip(paths, PROMPTS)])
    assert ours.dtype == np.float64 and ours.shape == (3,)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7)
    # The score depends on the prompt (not a constant): swapping prompts changes it.
    swapped = scorer([load_tensor(p) for p in paths], PROMPTS[::-1]).numpy()
    assert not np.allclose(swapped, ours)
    assert scorer.higher_is_better and scorer.name == "hps"


def test_hps_wrong_checkpoint_is_a_clear_error(setup, tmp_path):
    (tmp_path / "hps").mkdir()
    torch.save({"state_dict": {"layers.0.weight": torch.zeros(3, 3)}}, tmp_path / "hps" / "HPS_v2.1_compressed.pt")
    with pytest.raises(EPDError, match="does not hold a HPSv2.1 open_clip .* missing keys"):
        get_scorer("hps", weights_dir=tmp_path, model_name=TINY)
    (tmp_path / "hps" / "HPS_v2.1_compressed.pt").write_bytes(b"not a torch file")
    with pytest.raises(EPDError, match="cannot read as a HPSv2.1 checkpoint"):
        get_scorer("hps", weights_dir=tmp_path, model_name=TINY)
