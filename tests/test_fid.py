"""FID: Fréchet distance against closed forms, clean-fid resize, FID Inception architecture on random weights."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg

from epd.errors import EPDError
from epd.metrics.fid import clean_resize, feature_stats, frechet_distance, save_stats
from epd.rewards import get_scorer


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    a, b = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # rotating both Gaussians by the same orthogonal matrix changes nothing
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    got = frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_full_and_singular():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(200, 6)), rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + 0.5
    (m1, s1), (m2, s2) = feature_stats(x), feature_stats(y)
    covmean = linalg.sqrtm(s1 @ s2).real
    ref = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-8)
    # fewer samples than dimensions: rank-deficient covariances stay finite and exact
    f = rng.normal(size=(5, 64))
    mu, sig = feature_stats(f)
    assert np.linalg.matrix_rank(sig) < 64
    assert frechet_distance(mu, sig, mu, sig) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(mu, sig, mu + 1.0, sig) == pytest.approx(64.0, rel=1e-8)
    with pytest.raises(EPDError, match="at least 2"):
        feature_stats(f[:1])


def test_clean_resize_is_float_pil_bicubic():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (200, 150, 3), dtype=np.uint8)
    r = clean_resize(img)
    assert r.shape == (299, 299, 3) and r.dtype == np.float32 and 0 <= r.min() and r.max() <= 255
    assert np.any(r != np.round(r))  # not re-quantised to 8 bit
    # torch's anti-aliased bicubic is designed to match PIL's (a = -0.5, support scaled on downsampling)
    t = F.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None].float(), size=(299, 299), mode="bicubic",
                      antialias=True, align_corners=False)[0].permute(1, 2, 0).clamp(0, 255).numpy()
    assert np.abs(t - r).max() < 0.05
    bil = F.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None].float(), size=(299, 299), mode="bilinear")
    assert np.abs(bil[0].permute(1, 2, 0).numpy() - r).mean() > 1.0  # the legacy pytorch resize differs


def test_inception_layout_and_fid_blocks(one_thread):
    from torchvision.models.inception import Inception3, InceptionA, InceptionE

    from epd.metrics.inception import FIDInceptionV3

    torch.manual_seed(0)
    net = FIDInceptionV3().eval()
    ref = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    ours_sd, ref_sd = net.net.state_dict(), ref.state_dict()
    assert list(ours_sd) == list(ref_sd)  # pytorch-fid checkpoint layout
    assert all(ours_sd[k].shape == ref_sd[k].shape for k in ref_sd)
    assert ours_sd["fc.weight"].shape == (1008, 2048)
    x = torch.randn(2, 192, 35, 35)
    with torch.no_grad():
        a = net.net.Mixed_5b
        tv = InceptionA(192, pool_features=32).eval()
        tv.load_state_dict(a.state_dict())
        out, out_tv = a(x), tv(x)
        # the first three branches agree with torchvision; the pool branch excludes the padding
        assert torch.allclose(out[:, :224], out_tv[:, :224])
        pool = a.branch_pool(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))
        assert torch.allclose(out[:, 224:], pool) and not torch.allclose(out[:, 224:], out_tv[:, 224:])
        e = net.net.Mixed_7c
        tv_e = InceptionE(2048).eval()
        tv_e.load_state_dict(e.state_dict())
        xe = torch.randn(1, 2048, 8, 8)
        oe = e(xe)
        assert torch.allclose(oe[:, -192:], e.branch_pool(F.max_pool2d(xe, 3, 1, 1)))  # max pool in the last block
        assert torch.allclose(oe[:, :-192], tv_e(xe)[:, :-192], atol=1e-5)
        f = net.features(torch.randn(2, 3, 299, 299))
    assert f.shape == (2, 2048) and torch.isfinite(f).all() and (f >= 0).all()  # post-ReLU average pool


@pytest.fixture(scope="module")
def fid_setup(tmp_path_factory):
    from epd.metrics.inception import FIDInceptionV3

    root = tmp_path_factory.mktemp("fid")
    (root / "w" / "fid").mkdir(parents=True)
    torch.manual_seed(0)
    net = FIDInceptionV3()
    for m in net.modules():  # He init keeps activations O(1); the default init decays them into slow denormals
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.net.state_dict(), root / "w" / "fid" / "pt_inception-2015-12-05.pth")
    rng = np.random.default_rng(3)
    for name, shift in [("a", 0), ("b", 80)]:
        d = root / name
        (d / ".ipynb_checkpoints").mkdir(parents=True)
        for i in range(3):
            arr = np.clip(rng.integers(0, 176, (64, 48, 3)) + shift, 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"{i}.png")
        Image.fromarray(arr).save(d / ".ipynb_checkpoints" / "2-checkpoint.png")  # must be skipped
    return root


@pytest.fixture
def one_thread():
    import contextlib

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        threadpool_limits = None
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core CI box: one thread avoids OpenMP/BLAS contention stalls
    with (threadpool_limits(1) if threadpool_limits else contextlib.nullcontext()):
        yield
    torch.set_num_threads(n)


def test_fid_scorer_end_to_end(fid_setup, tmp_path, one_thread):
    from epd.metrics.imagedir import iter_image_files, load_image

    root = fid_setup
    s = get_scorer("fid_clean", weights_dir=root / "w", batch_size=3)
    assert s.kind == "set" and not s.higher_is_better
    fa = s.features(root / "a")
    assert fa.shape == (3, 2048)  # the .ipynb_checkpoints copy is not counted
    # same features from decoded tensors as from the files
    t = torch.stack([load_image(p) for p in iter_image_files(root / "a")])
    np.testing.assert_allclose(s.features(t), fa, rtol=1e-6, atol=1e-6)
    fb = s.features(root / "b")
    (ma, sa), (mb, sb) = feature_stats(fa), feature_stats(fb)
    save_stats(tmp_path / "b.npz", mb, sb, 3)
    d_ab = s.compute(root / "a", tmp_path / "b.npz")  # directory vs cached reference statistics
    # rank-2 covariances: tr sqrt(Sa Sb) is the nuclear norm of A B^T / (n - 1) (A, B centred features)
    a_c, b_c = fa - fa.mean(0), fb - fb.mean(0)
    closed = np.sum((ma - mb) ** 2) + np.trace(sa) + np.trace(sb) - 2 * np.linalg.norm(a_c @ b_c.T, "nuc") / 2
    assert d_ab == pytest.approx(closed, rel=1e-6) and d_ab > 0
    save_stats(tmp_path / "legacy.npz", mb, sb, 3, protocol="legacy_pytorch")
    with pytest.raises(EPDError, match="never compare FIDs across protocols"):
        s.compute(root / "a", tmp_path / "legacy.npz")


def test_fid_wrong_weights(tmp_path):
    from torchvision.models import resnet18

    (tmp_path / "fid").mkdir()
    torch.save(resnet18().state_dict(), tmp_path / "fid" / "pt_inception-2015-12-05.pth")
    with pytest.raises(EPDError, match="does not hold a FID Inception-v3"):
        get_scorer("fid_clean", weights_dir=tmp_path)
