"""Stage 1 on the analytic GMM backbone: teacher sets, distillation (accuracy, exact resume), sampling CLI inputs."""

import json
import sys
from pathlib import Path

import pytest
import torch

from epd.backbones.gmm import GMMBackbone, make_gmm
from epd.distill import DistillConfig, EPDParameters, distill
from epd.errors import ConfigError, EPDError
from epd.io import parse_seeds, read_prompts
from epd.predictor import load, save
from epd.solvers import solve
from epd.table import check_compatible, uniform_table
from epd.study import load_teacher, teacher_sigmas
from epd.teacher import generate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import fixture  # noqa: E402

BB = GMMBackbone(make_gmm(dim=6, num_classes=2, per_class=3, seed=0, std_range=(0.1, 0.3)), guidance=2.0)


@pytest.fixture(scope="module")
def teacher_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    generate(BB, prompts=["0", "1"], seeds=list(range(256)), num_points=4, M=19, solver="heun", out_dir=out, batch=100)
    return out


def test_teacher_states_equal_dense_solve_at_student_points(teacher_set):
    student, dense = teacher_sigmas(BB, 4, 19)
    man, x, states = load_teacher(teacher_set, student)
    assert states.shape == (256, 3, 6) and len(man["shards"]) == 3
    x0 = BB.noise([7])
    out = solve("heun", BB.denoiser, x0, dense, cond=BB.prepare(["1"]), return_trajectory=True)
    for i in range(1, 4):
        assert torch.allclose(states[7, i - 1], out.trajectory[20 * i][0])
    assert torch.allclose(dense[::20], student)


def test_teacher_resumes_missing_shard(teacher_set, tmp_path):
    import shutil

    copy = tmp_path / "t"
    shutil.copytree(teacher_set, copy)
    (copy / "shard-00001.safetensors").unlink()
    with pytest.raises(EPDError, match="shard-00001"):
        load_teacher(copy)
    generate(BB, prompts=["0", "1"], seeds=list(range(256)), num_points=4, M=19, solver="heun", out_dir=copy, batch=100)
    assert torch.equal(load_teacher(copy)[2], load_teacher(teacher_set)[2])


def test_teacher_from_another_grid_is_refused(teacher_set):
    other, _ = teacher_sigmas(BB, 5, 0)
    with pytest.raises(ConfigError, match="another grid"):
        load_teacher(teacher_set, other)


def test_teacher_settings_clash_refused(teacher_set):
    with pytest.raises(EPDError, match="different settings"):
        generate(BB, prompts=["0"], seeds=list(range(256)), num_points=4, M=19, solver="heun", out_dir=teacher_set)


def _distill(tmp, teacher_set, iterations=60, **kw):
    student, _ = teacher_sigmas(BB, 4, 0)
    man, x, s = load_teacher(teacher_set, student)
    cfg = DistillConfig(iterations=iterations, batch=64, lr=0.05, save_every=10, **kw)
    return distill(BB, sigmas=student, x_init=x, targets=s, prompts=man["prompts"], num_points=2, afs=True,
                   cfg=cfg, out_dir=tmp, scale_dir=0.05, scale_time=0.05)


def test_distilled_table_beats_baselines_on_heldout_noise(teacher_set, tmp_path):
    table = _distill(tmp_path, teacher_set, iterations=150)
    student, dense = teacher_sigmas(BB, 4, 19)
    seeds = list(range(5000, 5256))
    x, cond = BB.noise(seeds), BB.prepare([str(i % 2) for i in range(256)])
    ref = solve("heun", BB.denoiser, x, dense, cond=cond).x
    rmse = lambda a: float(((a - ref) ** 2).mean().sqrt())  # noqa: E731
    epd = rmse(solve("epd", BB.denoiser, x, student, cond=cond, table=table).x)
    init = rmse(solve("epd", BB.denoiser, x, student, cond=cond, table=uniform_table(4, 2, meta={"afs": True})).x)
    best = min(rmse(solve(n, BB.denoiser, x, BB.sigmas(6), cond=cond).x) for n in ("euler", "dpmpp_2m", "ipndm", "unipc"))
    assert epd < 0.8 * best and epd < 0.5 * init
    assert table.meta["afs"] is True and table.scale_dir is not None


def test_distill_resume_equals_uninterrupted(teacher_set, tmp_path, monkeypatch):
    import epd.distill as D

    full = _distill(tmp_path / "full", teacher_set, iterations=30)
    real = D.sample_epd
    calls = {"n": 0}

    def dies_at_25(*a, **k):
        calls["n"] += 1
        if calls["n"] == 25:  # killed during iteration 25, after the checkpoint of iteration 20
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(D, "sample_epd", dies_at_25)
    with pytest.raises(KeyboardInterrupt):
        _distill(tmp_path / "killed", teacher_set, iterations=30)
    assert torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["iteration"] == 20
    assert not (tmp_path / "killed" / "table.safetensors").exists()
    monkeypatch.setattr(D, "sample_epd", real)
    resumed = _distill(tmp_path / "killed", teacher_set, iterations=30)
    assert torch.equal(resumed.positions, full.positions) and torch.equal(resumed.weights, full.weights)
    assert torch.equal(resumed.scale_dir, full.scale_dir) and torch.equal(resumed.scale_time, full.scale_time)


def test_feature_loss_is_the_stated_final_step_term(teacher_set, tmp_path):
    """With identity features, ``feature_weight * mean ||f(x_N) - f(x_N^T)||^2`` is exactly the final-step L2
    term: distilling with (final 1, feature w) must equal distilling with (final 1 + w, no feature loss)."""
    student, _ = teacher_sigmas(BB, 4, 0)
    man, x, s = load_teacher(teacher_set, student)

    def run(out, feature_fn=None, **kw):
        cfg = DistillConfig(iterations=20, batch=64, lr=0.05, save_every=10, **kw)
        return distill(BB, sigmas=student, x_init=x, targets=s, prompts=man["prompts"], num_points=2, afs=True,
                       cfg=cfg, out_dir=out, scale_dir=0.05, feature_fn=feature_fn)

    a = run(tmp_path / "feat", lambda v: v.flatten(1), feature_weight=3.0)
    b = run(tmp_path / "final", final_weight=4.0)
    c = run(tmp_path / "plain")
    assert torch.allclose(a.positions, b.positions, atol=1e-9) and torch.allclose(a.weights, b.weights, atol=1e-9)
    assert not torch.allclose(a.positions, c.positions, atol=1e-6)  # the term does change the result
    with pytest.raises(ConfigError, match="feature_weight"):
        run(tmp_path / "none", feature_weight=1.0)
    with pytest.raises(ConfigError, match="feature_weight"):
        DistillConfig.from_dict({"feature_weight": -1})


def test_metric_features_only_for_digits():
    from epd.distill import metric_features

    with pytest.raises(ConfigError, match="only digits"):
        metric_features({"kind": "sd15"}, "/nowhere")


def test_epd_parameters_roundtrip_table():
    t = uniform_table(5, 3, meta={"afs": False})
    p = EPDParameters(t, scale_dir=0.1)
    back = p.to_table()
    assert torch.allclose(back.positions, t.positions, atol=1e-6) and torch.allclose(back.weights, t.weights, atol=1e-6)
    assert torch.allclose(back.scale_dir, torch.ones_like(t.positions), atol=1e-6)


def test_native_snapshot_roundtrip_exact(tmp_path):
    seg = torch.distributions.Dirichlet(torch.ones(3)).sample((4,)).double()
    t = uniform_table(5, 2, meta={"backbone": "gmm", "afs": True})
    t2 = type(t).from_segments(seg, t.weights, scale_dir=1 + 0.01 * torch.rand(4, 2), meta=t.meta, provenance={"x": 1})
    save(t2, tmp_path / "snap")
    back = load(tmp_path / "snap.safetensors")
    assert back.equal(t2) and back.meta == t2.meta and back.provenance == {"x": 1}


def test_snapshot_contradicting_backbone_named(tmp_path):
    t = uniform_table(11, 2, meta={"backbone": "sd3", "schedule_type": "flowmatch", "img_resolution": 1024})
    with pytest.raises(ConfigError, match="backbone: snapshot has 'sd3'.*num_steps: snapshot has 11"):
        check_compatible(t, backbone="sd15", num_steps=9)


@pytest.mark.parametrize("spec,msg", [("5-2", "descending"), ("", "empty"), ("a-b", "cannot parse"), ("-3", "must lie in")])
def test_bad_seed_ranges(spec, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_seeds(spec)


def test_seed_ranges():
    assert parse_seeds("0-3,7,9-10") == [0, 1, 2, 3, 7, 9, 10]


def test_prompt_files(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(EPDError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")
    (tmp_path / "p.txt").write_bytes("\ufeffa cat\r\na dog".encode())
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    (tmp_path / "p.csv").write_text(",file_name,caption\n0,x.jpg,a bird\n1,y.jpg,a fish\n")
    assert read_prompts(tmp_path / "p.csv") == ["a bird", "a fish"]
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(EPDError, match="expected one of"):
        read_prompts(tmp_path / "bad.csv")
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01")
    with pytest.raises(EPDError, match="binary"):
        read_prompts(tmp_path / "bin.txt")


def test_fixture_prompt_files():
    root = fixture("rlepd/prompts")
    assert len(read_prompts(root / "test.txt")) == 1000
    assert len(read_prompts(root / "MS-COCO_val2014_30k_captions.csv")) == 30000
    coco = read_prompts(root / "coco10k.csv")
    assert len(coco) == 10000 and coco[:3] == read_prompts(root / "coco10k.txt")[:3]
    _ = json


def test_distill_moves_teacher_batches_to_the_backbone_device(tmp_path):
    """Teacher states are loaded in host memory; each batch must go to the backbone's device (on the GPU the SD1.5
    chain failed with 'Input type (torch.HalfTensor) and weight type (torch.cuda.HalfTensor)'). A backbone on the
    meta device stands in for the GPU: every denoiser input must arrive there."""
    from epd.distill import DistillConfig as DC

    class MetaBackbone:
        device = torch.device("meta")

        def prepare(self, prompts):
            return None

        def weights(self):
            return []

        def denoiser(self, x, sigma, cond=None):
            assert x.device.type == "meta", f"denoiser input on {x.device}"
            return x * 0

    sig = BB.sigmas(4).double()
    x0, tgt = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 3, 6, dtype=torch.float64)
    with pytest.raises((RuntimeError, NotImplementedError), match="meta"):  # reaches the loss (no .item() on meta)
        distill(MetaBackbone(), sigmas=sig, x_init=x0, targets=tgt, prompts=["a"] * 4, num_points=2, afs=False,
                cfg=DC(iterations=1, batch=2), out_dir=tmp_path)


def test_checkpointed_denoiser_gives_the_same_table(tmp_path):
    """distill.checkpoint_denoiser recomputes activations in the backward pass: memory for large networks, and the
    very same gradients, so the same table bit for bit."""
    from epd.distill import DistillConfig as DC

    st, _ = teacher_sigmas(BB, 4, 2)
    generate(BB, prompts=["0", "1"], seeds=list(range(16)), num_points=4, M=2, solver="heun",
             out_dir=tmp_path / "t", batch=16)
    man, x, s = load_teacher(tmp_path / "t", st)
    tables = [distill(BB, sigmas=st, x_init=x, targets=s, prompts=man["prompts"], num_points=2, afs=True,
                      cfg=DC(iterations=5, batch=8, checkpoint_denoiser=ck), out_dir=tmp_path / str(ck))
              for ck in (False, True)]
    for k in ("positions", "weights"):
        assert torch.equal(getattr(tables[0], k), getattr(tables[1], k)), k


def test_micro_batches_accumulate_the_whole_batch_gradient(tmp_path):
    """distill.micro_batch bounds the images per backward pass; the accumulated gradient is the batch's, so the
    table matches the one-pass table up to float summation order."""
    from epd.distill import DistillConfig as DC

    st, _ = teacher_sigmas(BB, 4, 2)
    generate(BB, prompts=["0", "1"], seeds=list(range(16)), num_points=4, M=2, solver="heun",
             out_dir=tmp_path / "t", batch=16)
    man, x, s = load_teacher(tmp_path / "t", st)
    tabs = {m: distill(BB, sigmas=st, x_init=x, targets=s, prompts=man["prompts"], num_points=2, afs=True,
                       cfg=DC(iterations=5, batch=8, micro_batch=m), out_dir=tmp_path / str(m)) for m in (None, 3, 8)}
    for k in ("positions", "weights"):
        assert torch.equal(getattr(tabs[None], k), getattr(tabs[8], k)), k  # one part: the very same bits
        diff = (getattr(tabs[None], k) - getattr(tabs[3], k)).abs().max().item()
        assert diff < 1e-6, (k, diff)  # float32 network: summation order moves the last bits
    with pytest.raises(ConfigError, match="distill.micro_batch"):
        DC.from_dict({"micro_batch": 0})
