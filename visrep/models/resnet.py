"""ResNet trunks from torchvision as encoders with our encoder interface (PAWS's ImageNet backbones)."""
from __future__ import annotations

from torch import Tensor, nn


class TorchvisionResNet(nn.Module):
    """A torchvision ResNet trunk (no classifier) as PAWS's backbone: ``forward(x)`` returns the
    globally pooled features as one token ``[B, 1, D]`` (the shape the ViT path reads its [CLS]
    from). Init as the official ``resnet.py`` (kaiming_normal fan_out convs, BN 1/0,
    zero_init_residual False = torchvision's default). ``in_chans`` != 3 replaces the stem conv.
    BatchNorm2d is per process (the official code converts to SyncBN when distributed)."""

    def __init__(self, name: str = "resnet50", in_chans: int = 3):
        super().__init__()
        import torchvision

        self.arch = dict(name=name, in_chans=in_chans)
        net = getattr(torchvision.models, name)(weights=None)
        if in_chans != 3:
            net.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.embed_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: Tensor, idx_keep: Tensor | None = None) -> Tensor:
        if idx_keep is not None:
            raise ValueError("a ResNet backbone does not drop patches")
        return self.net(x).unsqueeze(1)
