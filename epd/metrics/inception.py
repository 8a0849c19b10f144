"""The FID Inception-v3 network (TF ``inception-2015-12-05`` graph ported to PyTorch, pytorch-fid weight layout).

It is torchvision's ``Inception3`` (1008 classes, no aux head) with the four block changes that make the port
match the TF graph: average pools in ``Mixed_5b/5c/5d``, ``Mixed_6b..6e`` and ``Mixed_7b`` exclude the padding
(``count_include_pad=False``), and ``Mixed_7c`` pools with a max instead of an average. The state dict keys are
those of ``pt_inception-2015-12-05-6726825d.pth``. :meth:`FIDInceptionV3.features` returns the 2048-d pool3
features used by FID.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FIDInceptionV3"]


def _avg_pool_no_pad(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _blocks():
    from torchvision.models.inception import InceptionA, InceptionC, InceptionE

    class FIDInceptionA(InceptionA):
        def _forward(self, x):
            b1 = self.branch1x1(x)
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return [b1, b5, b3, self.branch_pool(_avg_pool_no_pad(x))]

    class FIDInceptionC(InceptionC):
        def _forward(self, x):
            b1 = self.branch1x1(x)
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            bd = x
            for m in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
                bd = m(bd)
            return [b1, b7, bd, self.branch_pool(_avg_pool_no_pad(x))]

    class FIDInceptionE(InceptionE):
        pool = "avg"

        def _forward(self, x):
            b1 = self.branch1x1(x)
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
            if self.pool == "avg":
                bp = _avg_pool_no_pad(x)
            else:  # the TF graph's last block uses a max pool here
                bp = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
            return [b1, b3, bd, self.branch_pool(bp)]

    class FIDInceptionEMax(FIDInceptionE):
        pool = "max"

    return FIDInceptionA, FIDInceptionC, FIDInceptionE, FIDInceptionEMax


class FIDInceptionV3(nn.Module):
    """FID Inception-v3 (2048-d pool3 features).

    Input to :meth:`features` is ``(B, 3, 299, 299)`` float already normalised to the network's range
    (``(x - 128) / 128`` for 8-bit values, as the TF graph does); see :mod:`epd.metrics.fid` for the protocols.
    """

    def __init__(self):
        super().__init__()
        from torchvision.models.inception import Inception3

        A, C, E, EMax = _blocks()
        net = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
        net.Mixed_5b = A(192, pool_features=32)
        net.Mixed_5c, net.Mixed_5d = A(256, pool_features=64), A(288, pool_features=64)
        net.Mixed_6b = C(768, channels_7x7=128)
        net.Mixed_6c, net.Mixed_6d = C(768, channels_7x7=160), C(768, channels_7x7=160)
        net.Mixed_6e = C(768, channels_7x7=192)
        net.Mixed_7b, net.Mixed_7c = E(1280), EMax(2048)
        self.net = net

    def state_dict_keys(self) -> list[str]:
        return list(self.net.state_dict())

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 299, 299)`` normalised input -> ``(B, 2048)`` pool3 features."""
        n = self.net
        for m in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1, n.Conv2d_4a_3x3,
                  n.maxpool2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b, n.Mixed_6c, n.Mixed_6d,
                  n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            x = m(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    forward = features
