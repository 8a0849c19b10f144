"""CUDA out-of-memory inside a stage's batch: one error naming the batch setting to lower, nothing half-written."""

import pytest
import torch

import epd.sample
import epd.teacher
from epd.backbones.gmm import GMMBackbone, make_gmm
from epd.errors import EPDError

BB = GMMBackbone(make_gmm(dim=6, num_classes=2, per_class=3, seed=0, std_range=(0.1, 0.3)), guidance=2.0)


def _oom(*a, **k):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 24.00 GiB")


def test_teacher_names_teacher_batch_and_writes_no_shard(tmp_path, monkeypatch):
    monkeypatch.setattr(epd.teacher, "solve", _oom)
    with pytest.raises(EPDError, match=r"the teacher solve: out of GPU memory at teacher.batch=8 .*lower "
                                       r"teacher.batch \(e.g. 4\)"):
        epd.teacher.generate(BB, prompts=["0", "1"], seeds=list(range(16)), num_points=4, M=1, solver="euler",
                             out_dir=tmp_path, batch=8)
    assert not list(tmp_path.glob("shard-*"))


def test_sample_names_sample_batch_and_writes_no_image(tmp_path, monkeypatch):
    monkeypatch.setattr(epd.sample, "sample_batch", _oom)
    with pytest.raises(EPDError, match=r"sampling euler: out of GPU memory at sample.batch \(epd sample --batch\)=5 "
                                       r".*\(e.g. 2\)"):
        epd.sample.sample_to_dir(BB, solver="euler", seeds=list(range(10)), prompts=["0"], outdir=tmp_path / "s",
                                 sigmas=torch.tensor([80.0, 1.0, 0.002]), batch=5)
    assert not [p for p in (tmp_path / "s").rglob("*") if p.is_file()]


def test_other_errors_pass_through_unchanged(tmp_path, monkeypatch):
    def bad(*a, **k):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(epd.teacher, "solve", bad)
    with pytest.raises(RuntimeError, match="^shape mismatch$"):
        epd.teacher.generate(BB, prompts=["0"], seeds=[0], num_points=4, M=1, solver="euler", out_dir=tmp_path)
