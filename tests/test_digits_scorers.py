"""Digits metrics: Fréchet distance against closed forms and scipy, and the classifier-based scorers on real digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from epd.backbones.digits import PROMPTS, load_split
from epd.backbones.digits.classifier import (DigitsClassifierConfig, fd_from_stats, feature_stats, frechet_distance,
                                             save_classifier, sqrtm_psd, train_classifier)
from epd.backbones.digits.scorers import make_accuracy, make_alignment, make_fd, make_realism, make_typicality
from epd.errors import EPDError



pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------- Fréchet distance
def test_fd_commuting_covariances_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 6)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))  # same eigenbasis: the covariances commute
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fd_from_stats(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)


def test_fd_general_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    m1, m2 = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(5), m2 @ m2.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert fd_from_stats(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)


def test_fd_singular_covariances_and_identical_sets():
    rng = np.random.default_rng(2)
    f = rng.normal(size=(50, 8))
    f[:, 3] = 0.0  # a dead feature: singular covariance
    assert frechet_distance(f, f) == pytest.approx(0.0, abs=1e-9)
    shift = np.zeros(8)
    shift[0] = 0.5
    assert frechet_distance(f, f + shift) == pytest.approx(0.25, abs=1e-9)  # pure mean shift: |c|^2
    r = sqrtm_psd(np.diag([4.0, 0.0, -1e-15]))
    np.testing.assert_allclose(r, np.diag([2.0, 0.0, 0.0]), atol=1e-7)


def test_fd_of_gaussian_samples_approaches_closed_form():
    rng = np.random.default_rng(3)
    a = rng.normal(0, 1.0, size=(20000, 3))
    b = rng.normal(0.3, 2.0, size=(20000, 3))
    expected = 3 * 0.3**2 + 3 * (1.0 - 2.0) ** 2
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.03)
    mu, cov = feature_stats(torch.tensor(a))
    assert cov.shape == (3, 3) and mu.dtype == np.float64


# ---------------------------------------------------------------------- scorers on real digits
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("digits_clf")
    split = load_split(0)
    cfg = DigitsClassifierConfig(steps=600)
    torch.manual_seed(0)
    clf, stats = train_classifier(split, cfg)
    save_classifier(d, clf, cfg, {"data": {"split_seed": 0, "n_heldout": 297}, **stats})
    return d, split, stats


def _img(x):
    return ((x + 1) / 2).expand(-1, 3, -1, -1)


def test_real_heldout_digits_are_read(trained):
    d, split, stats = trained
    prompts = [PROMPTS[int(c)] for c in split.y_heldout]
    acc = make_accuracy(d)(_img(split.x_heldout), prompts)
    assert acc.shape == (297,) and acc.dtype == torch.float64 and set(acc.tolist()) <= {0.0, 1.0}
    assert acc.mean() >= 0.95
    assert acc.mean().item() == pytest.approx(stats["heldout_accuracy"])


def test_alignment_is_log_probability(trained):
    d, split, _ = trained
    x = _img(split.x_heldout[:20])
    labels = split.y_heldout[:20]
    scorer = make_alignment(d)
    assert scorer.higher_is_better and scorer.name == "digits_alignment"
    per_class = torch.stack([scorer(x, [str(c)] * 20) for c in range(10)], 1)
    assert (per_class <= 0).all()
    torch.testing.assert_close(per_class.exp().sum(1), torch.ones(20, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    own = scorer(x, [PROMPTS[int(c)] for c in labels])
    torch.testing.assert_close(own, per_class.gather(1, labels[:, None])[:, 0])


def test_realism_ranks_real_digits_above_noise_and_wrong_class(trained):
    d, split, _ = trained
    scorer = make_realism(d)
    x = _img(split.x_heldout)
    right = scorer(x, [str(int(c)) for c in split.y_heldout])
    wrong = scorer(x, [str((int(c) + 1) % 10) for c in split.y_heldout])
    noise = scorer(torch.rand(297, 3, 8, 8, generator=torch.Generator().manual_seed(0)),
                   [str(int(c)) for c in split.y_heldout])
    assert (right <= 0).all()
    assert right.mean() > wrong.mean() + 1 and right.mean() > noise.mean() + 1
    assert (right > wrong).float().mean() > 0.9


def test_typicality_is_zero_at_the_train_median_and_penalises_prototypes(trained):
    """``-|log(m / median_train m_y)|`` from an independent computation; a class-mean image (the prototype, what
    ``digits_realism`` rewards most) and noise both score below the real held-out digits."""
    d, split, _ = trained
    real, typ = make_realism(d), make_typicality(d)
    assert typ.higher_is_better and typ.name == "digits_typicality"
    labels = [str(int(c)) for c in split.y_train]
    m = -real(_img(split.x_train), labels)
    med = torch.stack([m[split.y_train == c].median() for c in range(10)])
    got = typ(_img(split.x_train), labels)
    torch.testing.assert_close(got, -(m / med[split.y_train]).log().abs(), rtol=1e-5, atol=1e-6)
    assert (got <= 0).all() and (got > -1e-6).sum() >= 10  # each class's median image scores 0
    held = typ(_img(split.x_heldout), [str(int(c)) for c in split.y_heldout]).mean()
    protos = torch.stack([split.x_train[split.y_train == c].mean(0) for c in range(10)])
    proto = typ(_img(protos), [str(c) for c in range(10)]).mean()
    assert real(_img(protos), [str(c) for c in range(10)]).mean() > real(_img(split.x_heldout), [
        str(int(c)) for c in split.y_heldout]).mean()  # realism prefers the prototype ...
    assert proto < held - 0.2  # ... typicality does not


def test_scores_do_not_depend_on_upsampling(trained):
    d, split, _ = trained
    x8 = _img(split.x_heldout[:10])
    x16 = x8.repeat_interleave(2, -1).repeat_interleave(2, -2)
    prompts = [str(int(c)) for c in split.y_heldout[:10]]
    for make in (make_alignment, make_realism):
        torch.testing.assert_close(make(d)(x16, prompts), make(d)(x8, prompts), rtol=1e-5, atol=1e-5)


def test_fd_scorer(trained):
    d, split, _ = trained
    fd = make_fd(d)
    assert fd.kind == "set" and not fd.higher_is_better
    ho = _img(split.x_heldout)
    assert fd.compute(ho, ho) == pytest.approx(0.0, abs=1e-6)
    real = fd.compute(_img(split.x_train[:297]), ho)
    blurred = torch.nn.functional.avg_pool2d(ho, 3, 1, 1)
    assert 0 < real < fd.compute(blurred, ho)
    assert fd.compute(fd.features(ho), ho) == pytest.approx(0.0, abs=1e-6)


def test_bad_inputs(trained):
    d, split, _ = trained
    scorer = make_alignment(d)
    x = _img(split.x_heldout[:2])
    with pytest.raises(EPDError, match="2 images"):
        scorer(x, ["1"])
    with pytest.raises(EPDError, match="accepted forms"):
        scorer(x, ["1", "a cat"])
    with pytest.raises(EPDError, match=r"\[-1, 1\]\? map them"):
        scorer(x * 2 - 1, ["1", "2"])
    with pytest.raises(EPDError, match="multiple of 8"):
        scorer(torch.rand(2, 3, 10, 10), ["1", "2"])
    with pytest.raises(EPDError, match="weights_dir"):
        make_alignment(None)


def test_registry_builds_digits_scorers(trained):
    rewards = pytest.importorskip("epd.rewards")
    d, split, _ = trained
    for name in ("digits_alignment", "digits_realism", "digits_accuracy"):
        s = rewards.get_scorer(name, weights_dir=d)
        assert s(_img(split.x_heldout[:3]), ["0", "1", "2"]).shape == (3,)
    assert rewards.get_scorer("digits_fd", weights_dir=d).compute(_img(split.x_heldout), _img(split.x_heldout)) < 1e-6
