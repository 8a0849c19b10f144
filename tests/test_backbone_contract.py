"""The backbone contract, checked on a tiny instance of every backbone kind (gmm, digits, sd15, sd3, flux).

What every solver and stage relies on (:mod:`epd.backbones.base`): a strictly decreasing grid from
``sigmas(N, schedule)``, K parallel points stacked in one denoiser call equal to K separate calls, the shapes and
dtypes of ``prepare``/``noise``/``decode``, a saved backbone reloading to the same numbers, and capability flags
(:mod:`epd.backbones.adapter`) that agree with what the class does. Digits: a small untrained network with
perturbed weights (its output layers start at zero) and an untrained classifier, written with the package's own
``save_model``/``save_classifier``. Diffusers backbones: tiny random components (:mod:`_tiny_pipelines`), reloaded
from a ``save_pretrained`` folder through the weights resolver, as the workflow loads them.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from epd.backbones import KINDS, backbone_class, kinds_with, load_backbone  # noqa: E402
from epd.backbones.adapter import CAPABILITIES, BackboneAdapter  # noqa: E402
from epd.backbones.base import Backbone  # noqa: E402
from epd.denoiser import Denoiser, batch_of  # noqa: E402
from epd.errors import ConfigError  # noqa: E402

K, B = 3, 2  # parallel points, conditioning batch
# Study keys of a workflow section, and the keys the adapters read from it: together the schema's backbone keys.
STUDY = {"solvers": ["euler"], "nfes": [5], "metrics": ["clip"]}
ADAPTER_SECTION_KEYS = {"kind", "guidance", "model_path", "resolution", "coords", "backend_config"}


@dataclass
class Case:
    """A tiny backbone of one kind, the section that reloads it and what its outputs look like."""

    kind: str
    bb: object
    section: dict
    prompts: list
    schedules: tuple  # grid names it offers (None: its default)
    noise_dtype: torch.dtype
    image_shape: tuple | None  # decode output per sample (None: decode is the identity, as for the GMM)
    weights_dir: Path | None = None  # its trained folder (weights_folder backbones)
    # Stacked vs separate calls: exact, or this relative tolerance (see test_k_stacked_points_equal_single_calls).
    stack_rtol: float = 0.0


# ---------------------------------------------------------------------- tiny instances
def _gmm(tmp):
    section = {"kind": "gmm", "guidance": 1.5, **STUDY}
    bb = backbone_class("gmm").from_section(section)
    return Case("gmm", bb, section, ["0", "1"], (None, "edm", "logsnr", "time_uniform"), torch.float64, None)


def _digits(tmp):
    from epd.backbones.digits import DEFAULT_ARCH, FORMAT, FORMAT_VERSION, DigitsBackbone, build_net, save_model
    from epd.backbones.digits.classifier import DigitsClassifier, DigitsClassifierConfig, save_classifier

    arch = {**DEFAULT_ARCH, "channels": 8, "emb_dim": 16}
    torch.manual_seed(0)
    net = build_net(arch)
    with torch.no_grad():  # untrained: its zero-initialised output layers would make D linear in x
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    data = {"split_seed": 0, "n_heldout": 297, "upsample": 1}
    save_model(tmp, net, {"format": FORMAT, "version": FORMAT_VERSION, "arch": arch, "data": data})
    ccfg = DigitsClassifierConfig(hidden=[16, 8], steps=1)
    save_classifier(tmp, DigitsClassifier(ccfg.hidden, ccfg.dropout), ccfg, {"data": data})
    bb = DigitsBackbone(net, {"data": data}, guidance=1.5)
    return Case("digits", bb, {"kind": "digits", "guidance": 1.5, **STUDY},
                ["a handwritten digit seven", "3"], (None, "edm", "polynomial", "logsnr", "time_uniform"),
                torch.float32, (3, 8, 8), weights_dir=tmp)


def _sd15(tmp):
    from _tiny_pipelines import tiny_sd15

    from epd.backbones.sd15 import SCHEDULES, SD15Backbone

    bb = SD15Backbone.from_components(*tiny_sd15(cross_dim=768, sample_size=16), config={"resolution": 32})
    section = {"kind": "sd15", "guidance": 7.5, "resolution": 32, **STUDY}
    # 1e-6: the UNet's convolutions and attention run other CPU kernels (blocking) for another batch size.
    return Case("sd15", bb, section, ["a cat", "a dog"], (None, *SCHEDULES), torch.float32, (3, 32, 32),
                stack_rtol=1e-6)


def _flow_case(kind, tmp):
    from _tiny_pipelines import tiny_flux, tiny_sd3

    from epd.flow_schedules import FLOW_SCHEDULES

    cls = backbone_class(kind)
    parts = tiny_sd3() if kind == "sd3" else tiny_flux()
    cfg = {"resolution": 512, "max_sequence_length": 16}  # 512: the smallest resolution their weights check allows
    bb = cls.from_components(*parts, config=cfg)
    section = {"kind": kind, "resolution": 512, "backend_config": {"max_sequence_length": 16}, **STUDY}
    # 1e-6: the transformer's matmuls and attention run other CPU kernels (blocking) for another batch size.
    return Case(kind, bb, section, ["a cat", "a dog"], (None, *FLOW_SCHEDULES), torch.float32, (3, 512, 512),
                stack_rtol=1e-6)


BUILDERS = {"gmm": _gmm, "digits": _digits, "sd15": _sd15, "sd3": lambda t: _flow_case("sd3", t),
            "flux": lambda t: _flow_case("flux", t)}


@pytest.fixture(scope="module", params=list(BUILDERS))
def case(request, tmp_path_factory):
    if request.param in ("sd15", "sd3", "flux"):
        pytest.importorskip("diffusers")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield BUILDERS[request.param](tmp_path_factory.mktemp(request.param))
    torch.set_num_threads(n)


def test_every_kind_is_covered():
    assert set(BUILDERS) == set(KINDS)


# ---------------------------------------------------------------------- the Backbone protocol
def test_protocol_and_class(case):
    bb = case.bb
    assert isinstance(bb, Backbone) and isinstance(bb.denoiser, Denoiser)
    assert type(bb) is backbone_class(case.kind) and issubclass(type(bb), BackboneAdapter)
    assert bb.name == case.kind and bb.coords in ("edm", "flow")
    assert bb.denoiser.coords == bb.coords and bb.denoiser.passes_per_eval in (1, 2)


@pytest.mark.parametrize("n", [2, 5, 11])
def test_grid_strictly_decreasing(case, n):
    for schedule in case.schedules:
        s = case.bb.sigmas(n, schedule)
        assert s.shape == (n,), schedule
        assert torch.all(s[1:] < s[:-1]), f"{case.kind} {schedule} N={n}: {s.tolist()}"
        assert torch.all(torch.isfinite(s)) and s[-1] >= 0


def test_prepare_noise_decode_shapes_and_dtypes(case):
    bb = case.bb
    cond = bb.prepare(case.prompts)
    assert batch_of(cond, -1) == len(case.prompts)
    z = bb.noise([3, 4, 5])
    assert z.dtype == case.noise_dtype and z.shape[0] == 3
    assert torch.equal(bb.noise([4]), z[1:2])  # one generator per seed: a seed's draw is independent of the others
    assert torch.equal(bb.noise([3, 4, 5]), z)
    x0 = bb.denoiser(z, bb.sigmas(5)[1].expand(3), bb.prepare(case.prompts[:1] * 3))
    assert x0.shape == z.shape and x0.dtype == z.dtype and torch.isfinite(x0).all()
    img = bb.decode(x0)
    if case.image_shape is None:
        assert torch.equal(img, x0)
    else:
        assert img.shape == (3, *case.image_shape) and img.dtype == torch.float32
        assert 0 <= float(img.min()) and float(img.max()) <= 1


@torch.no_grad()
def test_k_stacked_points_equal_single_calls(case):
    """K points in one call (state batch K * B, point-major, cond prepared for B) equal K calls of B. Exact for the
    GMM and the digits network; within 1e-6 (relative) for the diffusers networks, whose CPU matmul, convolution
    and attention kernels block the work differently for another batch size (another summation order)."""
    bb = case.bb
    cond = bb.prepare(case.prompts)
    grid = bb.sigmas(6)
    sig = torch.stack([grid[1], grid[2], grid[4]])
    x = bb.noise(list(range(K * B)))
    stacked = bb.denoiser(x, sig.repeat_interleave(B), cond)
    single = torch.cat([bb.denoiser(x[k * B:(k + 1) * B], sig[k].expand(B), cond) for k in range(K)])
    assert stacked.shape == x.shape
    if case.stack_rtol == 0:
        assert torch.equal(stacked, single)
    else:
        rel = float((stacked - single).norm() / single.norm())
        assert rel <= case.stack_rtol, rel


# ---------------------------------------------------------------------- save and reload
def _outputs(bb, prompts):
    z = bb.noise([7, 8])
    return bb.denoiser(z, bb.sigmas(5)[2].expand(2), bb.prepare(prompts))


def _save_diffusers(case, monkeypatch, tmp_path):
    """Write the pipeline as a diffusers folder where the resolver finds it (``$EPD_DATA_DIR/weights/<rel>``)."""
    from epd.backbones.weights import REGISTRY

    for var in ("EPD_WEIGHTS_DIR", "HF_HUB_CACHE", type(case.bb).weights_env()):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("EPD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    folder = tmp_path / "data" / "weights" / REGISTRY[("backbone", type(case.bb).weights_name)].rel
    case.bb.pipe.save_pretrained(folder)
    return folder


@torch.no_grad()
def test_save_and_reload_equal(case, monkeypatch, tmp_path):
    """gmm: the section rebuilds the same mixture; digits: save_model then load through the section and
    ``--weights``; diffusers: save_pretrained then load through the resolver (bit for bit: the loaded weights are
    re-homed off the memory map, see ``own_cpu_weights``)."""
    kw = {}
    if case.kind in ("sd15", "sd3", "flux"):
        _save_diffusers(case, monkeypatch, tmp_path)
    if case.weights_dir is not None:
        kw["weights_dir"] = str(case.weights_dir)
    loaded = load_backbone(case.section, **kw)
    assert type(loaded) is type(case.bb)
    assert torch.equal(_outputs(loaded, case.prompts), _outputs(case.bb, case.prompts))
    assert torch.equal(loaded.sigmas(7), case.bb.sigmas(7))


# ---------------------------------------------------------------------- capabilities agree with behaviour
def test_capabilities_are_read_from_the_class():
    for kind in KINDS:
        cls = backbone_class(kind)
        assert {c: cls.supports(c) for c in CAPABILITIES}  # every flag readable without an instance or weights
    assert kinds_with("trainable") == ["digits"] and kinds_with("metric_features") == ["digits"]
    assert kinds_with("needs_weights_check") == ["sd15", "sd3", "flux"]
    with pytest.raises(ConfigError, match="backbone kind: unknown 'sdxl'"):
        backbone_class("sdxl")


def test_trainable_matches_the_train_command(case, tmp_path):
    """``epd backbone train`` (the CLI table's module) accepts exactly the trainable kinds."""
    import importlib

    from epd.cli import COMMANDS

    train = importlib.import_module(dict((w, m) for w, m, _ in COMMANDS)[("backbone", "train")])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"backbones": {"b": case.section}}))
    if backbone_class(case.kind).trainable:
        train.load_train_config(cfg, "b")
    else:
        with pytest.raises(ConfigError, match="trains only"):
            train.load_train_config(cfg, "b")


def test_weights_folder_and_weights_check(case, monkeypatch, tmp_path):
    cls = backbone_class(case.kind)
    if cls.weights_folder:  # loads from the folder given as --weights, and only from it
        with pytest.raises(ConfigError, match="--weights DIR"):
            load_backbone(case.section)
    if cls.needs_weights_check:  # the folder is validated without loading it
        folder = _save_diffusers(case, monkeypatch, tmp_path)
        assert cls.check(case.section) == folder
    else:
        with pytest.raises(ConfigError, match="no local weights to check"):
            cls.check(case.section)


def test_metric_features_capability(case):
    from epd.distill import metric_features

    cls = backbone_class(case.kind)
    if not cls.supports("metric_features"):
        with pytest.raises(ConfigError, match=r"distill\.feature_weight: backbone kind .*\(only digits\); set it to 0"):
            metric_features(case.section, case.weights_dir)
        return
    f = metric_features(case.section, str(case.weights_dir))
    z = case.bb.noise([1, 2])
    x = (0.3 * z / z.std()).requires_grad_(True)  # a final state inside the decoded [0, 1] range
    feats = f(x)
    assert feats.dim() == 2 and feats.shape[0] == 2
    feats.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # differentiable in the final state


def test_heldout_reference_capability(case):
    cls = backbone_class(case.kind)
    if not cls.supports("heldout_reference"):
        assert cls.heldout_reference is None
        return
    ref = cls.heldout_reference(str(case.weights_dir))
    assert ref.dim() == 4 and ref.shape[1:] == case.image_shape and ref.dtype == torch.float32
    assert 0 <= float(ref.min()) and float(ref.max()) <= 1
    with pytest.raises(ConfigError, match="--weights-dir"):
        cls.heldout_reference(None)


# ---------------------------------------------------------------------- the section's keys
def test_study_keys_and_adapter_keys_make_the_schema():
    """The workflow schema's backbone keys are the study's (:data:`epd.config.STUDY_KEYS`, ignored by adapters)
    and the ones adapters read; the old import path of STUDY_KEYS still works."""
    from epd.backbones.diffusers_common import STUDY_KEYS as from_backbones
    from epd.config import STUDY_KEYS, schema_path

    props = set(yaml.safe_load(schema_path().read_text())["$defs"]["backbone"]["properties"])
    assert from_backbones is STUDY_KEYS
    assert set(STUDY_KEYS) | ADAPTER_SECTION_KEYS == props and not set(STUDY_KEYS) & ADAPTER_SECTION_KEYS
