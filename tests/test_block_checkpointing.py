"""``distill.checkpoint_denoiser`` on the diffusers backbones also recomputes the network block by block.

FLUX.1-dev at 1024 px ran out of memory on an 80 GB H100 in Stage-1 distillation with only the whole denoiser call
checkpointed (one call's activations plus 34 GB of weights). With block checkpointing the recomputation of a call
keeps only the blocks' boundaries. Checked on tiny random pipelines of the three families: the learnt table is the
very same (same gradients), and the network's blocks really are run once more in the backward pass.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from epd.backbones import backbone_class  # noqa: E402
from epd.distill import DistillConfig, distill  # noqa: E402
from epd.study import load_teacher, teacher_sigmas  # noqa: E402
from epd.teacher import generate  # noqa: E402


def _backbone(kind):
    from _tiny_pipelines import tiny_flux, tiny_sd3, tiny_sd15

    if kind == "sd15":
        return backbone_class(kind).from_components(*tiny_sd15(cross_dim=768, sample_size=16),
                                                    config={"resolution": 32})
    parts = tiny_sd3() if kind == "sd3" else tiny_flux()
    return backbone_class(kind).from_components(*parts, config={"resolution": 512, "max_sequence_length": 16})


def _first_block(bb):
    """A module that diffusers' gradient checkpointing recomputes: a transformer block, or the UNet's first
    resnet (the UNet checkpoints inside its down blocks)."""
    net = getattr(bb.pipe, "transformer", None)
    return net.transformer_blocks[0] if net is not None else bb.pipe.unet.down_blocks[0].resnets[0]


def _distill(bb, teacher, tmp, checkpoint):
    st, _ = teacher_sigmas(bb, 3, 1)
    man, x, s = load_teacher(teacher, st)
    calls = [0]  # a pre-hook: torch's recomputation stops early, once it has what the backward needs
    hook = _first_block(bb).register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        table = distill(bb, sigmas=st, x_init=x, targets=s, prompts=man["prompts"], num_points=2, afs=False,
                        cfg=DistillConfig(iterations=1, batch=2, checkpoint_denoiser=checkpoint),
                        out_dir=tmp / f"ck{checkpoint}")
    finally:
        hook.remove()
    return table, calls[0]


@pytest.mark.parametrize("kind", ["sd15", "sd3", "flux"])
def test_block_checkpointing_keeps_the_table_and_recomputes_blocks(kind, tmp_path):
    bb = _backbone(kind)
    assert bb.supports("block_checkpointing")
    st, _ = teacher_sigmas(bb, 3, 1)
    generate(bb, prompts=["a cat", "a dog"], seeds=[0, 1], num_points=3, M=1, solver="euler",
             out_dir=tmp_path / "t", batch=2)
    plain, plain_calls = _distill(bb, tmp_path / "t", tmp_path, False)
    ckpt, ckpt_calls = _distill(bb, tmp_path / "t", tmp_path, True)
    # only the table learns: no network weight gets a gradient (FLUX: 24 GB of bf16 gradients otherwise)
    assert all(p.grad is None and not p.requires_grad for p in bb.weights())
    assert len(bb.weights()) == sum(1 for m in bb.pipe.components.values() if isinstance(m, torch.nn.Module)
                                    for _ in m.parameters())
    for k in ("positions", "weights"):
        diff = (getattr(plain, k) - getattr(ckpt, k)).abs().max().item()
        assert diff <= 1e-6, (k, diff)
    # the forward and the recomputation of each call give at most twice the plain count: more means that blocks
    # were recomputed on their own in the backward pass
    assert ckpt_calls > 2 * plain_calls, (plain_calls, ckpt_calls)
