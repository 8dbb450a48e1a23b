"""Wide ResNet (Zagoruyko & Komodakis, 2016) as PAWS uses it for CIFAR-10: WRN-28-2.

Pre-activation basic blocks ``x + conv(relu(bn(dropout(conv(relu(bn(x)))))))`` with the stride on the
second convolution and a 1x1 convolution on the shortcut where the shape changes; stage widths
16, 16k, 32k, 64k; a final BatchNorm + ReLU and global average pooling (``embed_dim = 64k``, 128 for
WRN-28-2). Matches facebookresearch/suncet ``src/wide_resnet.py`` (whose state-dict key names it
keeps, so its checkpoints load): convolutions with biases, dropout 0.3 inside the blocks, PyTorch's
default initialisation, and the final BatchNorm's ``momentum=0.99`` (PyTorch's convention: the
running statistics follow the latest batch almost entirely; kept as the reference has it).
"""
from __future__ import annotations

from torch import Tensor, nn

__all__ = ["WideResNet", "wide_resnet28_2"]


class WideBasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, dropout: float, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, padding=1, bias=True)
        self.dropout = nn.Dropout(dropout)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=True)
        needs_projection = stride != 1 or in_planes != planes
        self.shortcut = (nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=True))
                         if needs_projection else nn.Sequential())

    def forward(self, x: Tensor) -> Tensor:
        h = self.dropout(self.conv1(self.bn1(x).relu()))
        return self.conv2(self.bn2(h).relu()) + self.shortcut(x)


class WideResNet(nn.Module):
    """``forward(x)`` returns the pooled features as one token ``[B, 1, embed_dim]`` (the shape PAWS's
    ViT path reads its [CLS] token from); :meth:`features` returns ``[B, embed_dim]``."""

    def __init__(self, depth: int = 28, widen_factor: int = 2, dropout: float = 0.3, in_chans: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a Wide ResNet has depth 6n + 4, got {depth}")
        self.arch = dict(depth=depth, widen_factor=widen_factor, dropout=dropout, in_chans=in_chans)
        # official ``_wide_layer``: ``[stride] + [1] * (int(n) - 1)`` -- one block per stage even for depth 4
        blocks_per_stage = max(1, (depth - 4) // 6)
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_chans, widths[0], kernel_size=3, padding=1, bias=True)
        in_planes = widths[0]
        for i, (planes, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
            blocks = []
            for j in range(blocks_per_stage):
                blocks.append(WideBasicBlock(in_planes, planes, dropout, stride if j == 0 else 1))
                in_planes = planes
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.bn1 = nn.BatchNorm2d(widths[-1], momentum=0.99)
        self.embed_dim = widths[-1]

    def features(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.bn1(x).relu().mean(dim=(2, 3))

    def forward(self, x: Tensor, idx_keep: Tensor | None = None) -> Tensor:
        if idx_keep is not None:
            raise ValueError("a Wide ResNet backbone does not drop patches")
        return self.features(x).unsqueeze(1)


def wide_resnet28_2(in_chans: int = 3, dropout: float = 0.3) -> WideResNet:
    """WRN-28-2 (1.5M parameters): PAWS's CIFAR-10 backbone."""
    return WideResNet(28, 2, dropout=dropout, in_chans=in_chans)
