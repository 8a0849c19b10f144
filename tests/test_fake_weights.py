"""``epd weights fake``: random-weight stand-ins in the resolver's layout load through the product's real loaders.

One tiny generation (module fixture) is checked for: every registry entry resolving, every backbone loading through
``epd.backbones.load_backbone`` and denoising, every scorer loading through ``epd.rewards.get_scorer`` with no extra
argument and scoring, byte-identical output for one seed, refusal to overwrite, time and size. Full size is checked
without allocating it: parameter counts of the meta-device architectures against the released models'.
"""

import filecmp
import json
import math
import tempfile
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("open_clip")
pytest.importorskip("ImageReward")

from epd import fake_weights as fw  # noqa: E402
from epd.backbones import load_backbone  # noqa: E402
from epd.backbones.weights import REGISTRY, check_all  # noqa: E402
from epd.cli import main  # noqa: E402
from epd.rewards import get_scorer  # noqa: E402

SCORER_NAMES = ("hps", "pickscore", "imagereward", "imagereward_rlepd", "clip", "clip100", "aesthetic", "mps")


def _files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``epd weights fake --size tiny`` into a fresh root: (root, seconds)."""
    root = tmp_path_factory.mktemp("fake") / "weights"
    t0 = time.time()
    assert main(["weights", "fake", "--out", str(root), "--size", "tiny"]) == 0
    return root, time.time() - t0


@pytest.fixture
def weights_env(tiny, tmp_path, monkeypatch):
    """Only ``EPD_WEIGHTS_DIR`` (the tiny root) can resolve weights: no env paths, data dir or HF cache."""
    root, _ = tiny
    for var in [s.env for s in REGISTRY.values() if s.env] + ["HF_HUB_CACHE"]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("EPD_DATA_DIR", str(tmp_path / "no-data"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-hf"))
    monkeypatch.setenv("EPD_WEIGHTS_DIR", str(root))
    return root


def test_every_registry_entry_is_written_and_resolves(weights_env):
    written = {key for keys in fw.TARGETS.values() for key in keys}
    assert set(REGISTRY) <= written, f"registry entries without a fake: {set(REGISTRY) - written}"
    found = check_all(list(REGISTRY))
    assert all(str(p).startswith(str(weights_env)) for p in found.values())
    manifest = json.loads((weights_env / fw.MANIFEST).read_text())
    assert manifest["random_weights"] is True and "RANDOM WEIGHTS" in manifest["notice"]
    assert set(manifest["items"]) == set(fw.BACKBONES) | set(fw.SCORERS)
    assert all(r["size"] == "tiny" and r["seed"] == 0 and r["total_params"] > 0 for r in manifest["items"].values())
    assert {"torch", "diffusers", "transformers"} <= set(manifest["versions"])
    assert not list(weights_env.rglob(".tmp-*")) and not list(weights_env.rglob(".old-*"))


@pytest.mark.parametrize("kind", ["sd15", "sd3", "flux"])
def test_backbone_loads_through_the_adapter_and_denoises(weights_env, kind, one_thread):
    bb = load_backbone({"kind": kind, "resolution": 512}, device="cpu")
    assert bb.name == kind and bb.latent_shape[-1] == 64  # 512 px, VAE factor 8: the real latent geometry
    cond = bb.prepare(["a photo of an astronaut riding a horse", "a red car"])
    x = bb.noise([0, 1])
    out = bb.denoiser(x, bb.sigmas(4)[1].expand(2), cond)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    img = bb.decode(out[:1])
    assert img.shape == (1, 3, 512, 512) and torch.isfinite(img).all()


def test_scorers_load_with_no_arguments_and_score(weights_env, one_thread):
    imgs = torch.rand(2, 3, 96, 80, generator=torch.Generator().manual_seed(0))
    prompts = ["a photo of a cat", "an oil painting of a castle"]
    for name in SCORER_NAMES:
        scores = get_scorer(name)(imgs, prompts)
        assert scores.shape == (2,) and scores.dtype == torch.float64 and torch.isfinite(scores).all(), name


def test_fid_loads_with_no_arguments_and_computes(weights_env):
    imgs = torch.rand(2, 3, 64, 80, generator=torch.Generator().manual_seed(0))
    fid = get_scorer("fid_clean").compute(imgs, torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    assert math.isfinite(fid) and fid >= 0


def test_streamed_folder_equals_pipeline_save_pretrained(tiny, tmp_path):
    """Components saved one at a time plus model_index.json from meta twins give exactly the files that
    ``StableDiffusion3Pipeline(...).save_pretrained`` writes for the same modules held together."""
    import diffusers

    root, _ = tiny
    cls, parts, extra = fw.backbone_parts("sd3", "tiny")
    comps = {}
    with tempfile.TemporaryDirectory() as tok_tmp:
        for part in parts:
            if part.kind == "model":
                comps[part.name] = fw.build_empty(part.build)
                fw.materialise(comps[part.name], 0, f"sd3/{part.name}", torch.float32)
            elif part.kind == "tokenizer":
                comps[part.name] = part.build(Path(tok_tmp) / part.name)
            else:
                comps[part.name] = part.build()
        getattr(diffusers, cls)(**comps, **extra).save_pretrained(tmp_path / "sd3")
    ours, ref = _files(root / "sd3-medium"), _files(tmp_path / "sd3")
    assert ours.keys() == ref.keys()
    assert [f for f in ours if not filecmp.cmp(ours[f], ref[f], shallow=False)] == []


def test_same_seed_same_bytes_other_seed_other_weights(tiny, tmp_path):
    root, _ = tiny
    again = tmp_path / "again"
    assert main(["weights", "fake", "--out", str(again), "--size", "tiny", "--seed", "0", "--workers", "1"]) == 0
    a, b = _files(root), _files(again)
    assert a.keys() == b.keys()
    assert [f for f in a if not filecmp.cmp(a[f], b[f], shallow=False)] == []
    other = tmp_path / "other"
    assert main(["weights", "fake", "--out", str(other), "--size", "tiny", "--seed", "1", "--backbones", "sd15",
                 "--scorers", "hps,aesthetic"]) == 0
    c = _files(other)
    weights = [f for f in c if f.endswith((".safetensors", ".pt", ".pth"))]
    assert len(weights) == 5 and all(not filecmp.cmp(c[f], a[f], shallow=False) for f in weights)
    same = [f for f in c if f.startswith("sd15/tokenizer/") or (f.startswith("sd15/") and f.endswith(".json"))]
    assert same and all(filecmp.cmp(c[f], a[f], shallow=False) for f in same)


def test_refuses_to_overwrite_without_force(tiny, tmp_path, capsys):
    root = tmp_path / "w"
    assert main(["weights", "fake", "--out", str(root), "--size", "tiny", "--backbones", "none",
                 "--scorers", "aesthetic,clip"]) == 0
    before = {f: p.read_bytes() for f, p in _files(root).items()}
    capsys.readouterr()
    assert main(["weights", "fake", "--out", str(root), "--size", "tiny", "--backbones", "none",
                 "--scorers", "clip,aesthetic,fid", "--seed", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("epd weights fake: error: ") and "--force" in err[0]
    assert str(root / "clip" / "ViT-L-14.pt") in err[0]
    assert {f: p.read_bytes() for f, p in _files(root).items()} == before  # nothing written, not even fid
    assert main(["weights", "fake", "--out", str(root), "--size", "tiny", "--backbones", "none",
                 "--scorers", "clip", "--seed", "3", "--force"]) == 0
    after = _files(root)
    assert after["clip/ViT-L-14.pt"].read_bytes() != before["clip/ViT-L-14.pt"]
    manifest = json.loads(after[fw.MANIFEST].read_text())["items"]
    assert manifest["clip"]["seed"] == 3 and manifest["aesthetic"]["seed"] == 0  # earlier items are kept
    assert not [p for p in root.rglob("*") if p.name.startswith((".tmp-", ".old-", ".ViT"))]


def test_bad_names_are_one_error_line(tmp_path, capsys):
    assert main(["weights", "fake", "--out", str(tmp_path), "--size", "tiny", "--scorers", "hps,lpips"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'lpips'" in err[0] and "accepted" in err[0]
    assert not any(tmp_path.iterdir())


def test_tiny_generation_is_fast_and_small(tiny):
    root, seconds = tiny
    sizes = {f: p.stat().st_size for f, p in _files(root).items()}
    fid = sizes.pop(REGISTRY[("scorer", "inception")].rel)
    assert 90e6 < fid < 100e6  # the FID Inception is written at its only size, float32
    assert sum(sizes.values()) < 64e6, sorted(sizes.items(), key=lambda kv: -kv[1])[:5]
    assert max(sizes.values()) < 16e6
    assert seconds < 180  # seconds of work; most of it is importing diffusers/transformers on a busy CI box


# ---------------------------------------------------------------------- full size, without allocating it
def _backbone_count(name: str, component: str) -> int:
    _, parts, _ = fw.backbone_parts(name, "full")
    return fw.count_parameters(next(p for p in parts if p.name == component).build)


@pytest.mark.parametrize("name,component,expected", [
    ("sd15", "unet", 859.52e6),           # SD1.5 UNet
    ("sd15", "vae", 83.65e6),             # SD1.5 VAE
    ("sd15", "text_encoder", 123.06e6),   # CLIP ViT-L/14 text
    ("sd3", "transformer", 2.028e9),      # SD3-Medium MMDiT
    ("sd3", "text_encoder_2", 694.66e6),  # OpenCLIP bigG/14 text + projection
    ("sd3", "text_encoder_3", 4.762e9),   # T5-XXL v1.1 encoder
    ("flux", "transformer", 11.90e9),     # FLUX.1-dev
    ("flux", "vae", 83.82e6),             # 16-channel VAE
])
def test_full_size_backbones_have_the_released_parameter_counts(name, component, expected):
    assert _backbone_count(name, component) == pytest.approx(expected, rel=0.01)


def test_full_size_configs_match_the_releases():
    def cfg(name, component):
        _, parts, _ = fw.backbone_parts(name, "full")
        return fw.build_empty(next(p for p in parts if p.name == component).build).config

    sd3 = cfg("sd3", "transformer")
    assert (sd3.num_layers, sd3.num_attention_heads, sd3.attention_head_dim, sd3.patch_size) == (24, 24, 64, 2)
    assert (sd3.pos_embed_max_size, sd3.joint_attention_dim, sd3.caption_projection_dim,
            sd3.pooled_projection_dim) == (192, 4096, 1536, 2048)
    flux = cfg("flux", "transformer")
    assert (flux.num_layers, flux.num_single_layers, flux.num_attention_heads, flux.attention_head_dim) == \
        (19, 38, 24, 128)
    assert flux.guidance_embeds and tuple(flux.axes_dims_rope) == (16, 56, 56) and flux.pooled_projection_dim == 768
    for name, scale, shift in (("sd3", 1.5305, 0.0609), ("flux", 0.3611, 0.1159)):
        vae = cfg(name, "vae")
        assert (vae.latent_channels, vae.scaling_factor, vae.shift_factor) == (16, scale, shift)
    t5 = cfg("flux", "text_encoder_2")
    assert (t5.d_model, t5.num_layers, t5.num_heads, t5.d_ff, t5.vocab_size) == (4096, 24, 64, 10240, 32128)
    assert t5.is_gated_act and t5.dense_act_fn == "gelu_new"
    from epd.backbones import flux, sd3, sd15

    for name, mod in (("sd15", sd15), ("sd3", sd3), ("flux", flux)):  # the adapters' copies of the release values
        cls, release = fw.SCHEDULERS[name]
        assert mod.SCHEDULER_CONFIG["_class_name"] == cls
        assert {k: v for k, v in mod.SCHEDULER_CONFIG.items() if k != "_class_name"}.items() <= release.items()


@pytest.mark.parametrize("item,expected", [
    ("hps", 986.1e6),         # open_clip ViT-H-14
    ("pickscore", 986.1e6),   # transformers CLIP-ViT-H-14
    ("clip", 427.6e6),        # OpenAI ViT-L/14
    ("imagereward", 447.4e6),  # BLIP ViT-L/16 + BERT-base (cross-attention) + MLP
    ("fid", 23.9e6),          # FID Inception-v3 (1008 classes)
])
def test_full_size_scorers_have_the_released_parameter_counts(item, expected, monkeypatch):
    counts = {}

    def fake_materialise(module, seed, key, dtype, workers=None):  # count instead of allocating
        counts[key] = sum(p.numel() for p in module.parameters())
        raise StopIteration

    monkeypatch.setattr(fw, "materialise", fake_materialise)
    with tempfile.TemporaryDirectory() as tmp, pytest.raises(StopIteration):
        fw.WRITERS[item](Path(tmp), "full", 0)
    assert sum(counts.values()) == pytest.approx(expected, rel=0.01)


def test_full_size_tokenizers_and_one_small_component(tmp_path):
    from transformers import CLIPTokenizer, T5TokenizerFast

    _, parts, _ = fw.backbone_parts("sd3", "full")
    toks = {p.name: p.build(tmp_path / p.name) for p in parts if p.kind == "tokenizer"}
    assert len(toks["tokenizer"]) == 49408 and isinstance(toks["tokenizer"], CLIPTokenizer)
    assert toks["tokenizer_2"].pad_token == "!"
    t5 = toks["tokenizer_3"]
    assert isinstance(t5, T5TokenizerFast) and len(t5) == 32100 <= fw.T5_VOCAB["full"] == 32128
    assert t5.convert_tokens_to_ids("<extra_id_0>") == 32099 and (t5.pad_token_id, t5.eos_token_id) == (0, 1)
    rec = fw.write_aesthetic(tmp_path, "full", 0)  # the one full-size item small enough to write here
    sd = torch.load(tmp_path / rec["files"][0], weights_only=True)
    mlp = 768 * 1024 + 1024 + 1024 * 128 + 128 + 128 * 64 + 64 + 64 * 16 + 16 + 16 + 1
    assert sd["layers.0.weight"].shape == (1024, 768) and rec["params"]["mlp"] == mlp


@pytest.mark.parametrize("name", fw.BACKBONES)
def test_full_size_disk_estimate_matches_the_architectures(name):
    _, parts, _ = fw.backbone_parts(name, "full")
    n = sum(fw.count_parameters(p.build) for p in parts if p.kind == "model")
    assert fw.FULL_BYTES[name] == pytest.approx(2 * n, rel=0.03)  # bfloat16


def test_full_size_stops_early_without_disk_space(tmp_path, monkeypatch, capsys):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100e9, 99e9, 1e9))
    assert main(["weights", "fake", "--out", str(tmp_path / "w"), "--size", "full", "--backbones", "flux",
                 "--scorers", "none"]) == 2
    err = capsys.readouterr().err
    assert "about 34.5 GB needed for flux at full size, 1.0 GB free" in err
    assert not [p for p in (tmp_path / "w").rglob("*")]
