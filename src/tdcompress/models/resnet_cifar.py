"""CIFAR ResNets (He et al. 2016, section 4.2): 6n+2 layers, option A shortcuts (identity with
zero-padded channels, stride by subsampling), 16/32/64 channels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CifarResNet", "resnet20", "resnet32", "resnet56"]


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad = planes - in_planes

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; first conv ``conv1``, classifier ``fc``.

    He initialisation (normal, std sqrt(2 / fan)) of every conv and the classifier, BN scale 1
    and shift 0, as in He et al. 2016.
    """

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 8 or (depth - 2) % 6:
            raise ValueError(
                f"CifarResNet: depth must be 6n+2 (20, 32, 44, 56, 110), got {depth!r}"
            )
        for arg, v in (("num_classes", num_classes), ("in_channels", in_channels)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"CifarResNet: {arg} must be a positive int, got {v!r}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, planes_in = [], 16
        for i, planes in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(planes_in, planes, 2 if (i > 0 and j == 0) else 1))
                planes_in = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(
                    m.weight,
                    mode="fan_out" if isinstance(m, nn.Conv2d) else "fan_in",
                    nonlinearity="relu",
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(20, num_classes, in_channels)


def resnet32(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(32, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(56, num_classes, in_channels)
