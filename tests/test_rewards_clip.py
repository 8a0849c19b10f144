"""CLIP score and LAION aesthetic parity against the reference package code on identical tiny weights.

References: ``ImageReward.models.CLIPScore.CLIPScore.score`` (the class the original RLEPD scorer vendored)
and ``ImageReward.models.AestheticScore.AestheticScore.score`` (the LAION predictor on normalised CLIP ViT-L/14
embeddings), both from the installed ``image-reward`` package, with ``clip.load`` pointed at a local tiny
OpenAI-CLIP state dict instead of downloading ViT-L/14.
"""

import numpy as np
import pytest
import torch
from PIL import Image

clip = pytest.importorskip("clip")

from epd.errors import EPDError  # noqa: E402
from epd.rewards import get_scorer  # noqa: E402

PROMPTS = ["a photo of an astronaut riding a horse", "a red car in the snow", "an oil painting of a cat"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from clip.model import CLIP

    root = tmp_path_factory.mktemp("clip")
    wdir = root / "weights"
    (wdir / "clip").mkdir(parents=True)
    (wdir / "aesthetic").mkdir()
    torch.manual_seed(0)
    # embed_dim 768 as ViT-L/14 (the reference AestheticScore hard-codes MLP(768)); tiny widths/depths.
    model = CLIP(embed_dim=768, image_resolution=64, vision_layers=2, vision_width=64, vision_patch_size=16,
                 context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=2)
    torch.save(model.state_dict(), wdir / "clip" / "ViT-L-14.pt")
    from epd.rewards.aesthetic import AestheticMLP

    mlp = AestheticMLP(768)
    for p in mlp.parameters():  # the default init gives near-constant outputs; spread them
        torch.nn.init.normal_(p, std=0.2)
    torch.save(mlp.state_dict(), wdir / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth")
    rng = np.random.default_rng(2)
    paths = []
    for i, size in enumerate([(96, 96), (120, 80), (64, 64)]):
        p = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return wdir, paths


@pytest.fixture
def patched_clip_load(setup, monkeypatch):
    """Make the reference classes' ``clip.load("ViT-L/14", ...)`` read the local tiny checkpoint."""
    wdir, _ = setup
    orig = clip.load

    def local_load(name, device="cpu", jit=False, download_root=None):
        assert name == "ViT-L/14"
        return orig(str(wdir / "clip" / "ViT-L-14.pt"), device=device, jit=jit)

    monkeypatch.setattr(clip, "load", local_load)


def tensors(paths):
    return [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 255 for p in paths]


def test_clip_matches_imagereward_clipscore(setup, patched_clip_load):
    from ImageReward.models.CLIPScore import CLIPScore

    wdir, paths = setup
    ref_model = CLIPScore(download_root=None, device="cpu").eval()
    with torch.no_grad():
        ref = np.array([ref_model.score(t, str(p)) for t, p in zip(PROMPTS, paths)])
    ours = get_scorer("clip", weights_dir=wdir, batch_size=2)(tensors(paths), PROMPTS).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7)
    ours100 = get_scorer("clip100", weights_dir=wdir)(tensors(paths), PROMPTS).numpy()
    np.testing.assert_allclose(ours100, 100 * np.maximum(ref, 0), rtol=1e-5, atol=1e-5)


def test_aesthetic_matches_imagereward_aestheticscore(setup, patched_clip_load):
    from ImageReward.models.AestheticScore import AestheticScore

    wdir, paths = setup
    ref_model = AestheticScore(download_root=None, device="cpu")
    ref_model.mlp.load_state_dict(torch.load(wdir / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth"), strict=False)
    ref_model.eval()
    with torch.no_grad():
        ref = np.array([ref_model.score(t, str(p)) for t, p in zip(PROMPTS, paths)])
    ours = get_scorer("aesthetic", weights_dir=wdir, batch_size=3)(tensors(paths), PROMPTS).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    assert np.ptp(ref) > 1e-3  # scores differ between images


def test_wrong_weights_are_clear_errors(setup, tmp_path):
    wdir, _ = setup
    (tmp_path / "clip").mkdir()
    torch.save({"layers.0.weight": torch.zeros(2, 2)}, tmp_path / "clip" / "ViT-L-14.pt")
    with pytest.raises(EPDError, match="not an OpenAI CLIP checkpoint"):
        get_scorer("clip", weights_dir=tmp_path)
    # aesthetic file that is really a CLIP checkpoint
    paths = {"aesthetic": str(wdir / "clip" / "ViT-L-14.pt"), "clip_l14": str(wdir / "clip" / "ViT-L-14.pt")}
    with pytest.raises(EPDError, match="not a LAION aesthetic predictor"):
        get_scorer("aesthetic", paths=paths)
    # truncated checkpoint
    data = (wdir / "clip" / "ViT-L-14.pt").read_bytes()
    (tmp_path / "clip" / "ViT-L-14.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(EPDError, match="cannot read as a OpenAI CLIP checkpoint"):
        get_scorer("clip", weights_dir=tmp_path)


def test_input_validation(setup):
    wdir, _ = setup
    s = get_scorer("clip", weights_dir=wdir)
    with pytest.raises(EPDError, match=r"\[-1, 1\]"):
        s(torch.full((1, 3, 16, 16), -1.0), ["x"])
    with pytest.raises(EPDError, match="1 images but 2 prompts"):
        s(torch.zeros(1, 3, 16, 16), ["x", "y"])
    with pytest.raises(EPDError, match="NaN"):
        s(torch.full((1, 3, 16, 16), float("nan")), ["x"])
    # grayscale (1 channel) is replicated to RGB: same score as the explicit 3-channel image
    g = torch.rand(1, 1, 32, 32)
    assert torch.allclose(s(g, ["a cat"]), s(g.expand(1, 3, 32, 32), ["a cat"]))
