"""Architectures: a small CNN for 8x8 digits, CIFAR-style ResNet-18 and WideResNet.

Every model takes ``norm``: "batch" (BatchNorm), "group" (GroupNorm, which works with
``torch.func`` per-sample gradients and DP-style training) or, for the CNN, "none".
Inputs are expected in [0, 1]; no input normalisation happens inside the models.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

NORMS = ("none", "group", "batch")
MAX_GROUPS = 32


def _check_norm(norm: str, allowed: tuple[str, ...] = NORMS) -> None:
    if norm not in allowed:
        raise ValueError(f"norm must be one of {allowed}, got {norm!r}")


def norm_layer(norm: str, channels: int) -> nn.Module:
    """BatchNorm2d, GroupNorm (gcd(32, channels) groups, so the groups divide the channels) or identity."""
    _check_norm(norm)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(math.gcd(MAX_GROUPS, channels), channels)
    return nn.Identity()


def has_batchnorm(model: nn.Module) -> bool:
    """Whether any submodule is a BatchNorm layer (these break per-sample gradients)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class SmallCNN(nn.Module):
    """conv32-conv64-maxpool-fc32-fc: about 52k parameters for 1x8x8 digits."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, norm: str = "none") -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), norm_layer(norm, 32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), norm_layer(norm, 64), nn.ReLU(),
            nn.AdaptiveMaxPool2d(4),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions and a (projected) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_layer(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm_layer(norm, planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), norm_layer(norm, planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (3x3 stem, no max-pool) for 32x32 inputs."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, norm: str = "batch") -> None:
        super().__init__()
        _check_norm(norm, ("group", "batch"))
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = norm_layer(norm, 64)
        layers: list[nn.Module] = []
        in_planes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(in_planes, planes, stride, norm), BasicBlock(planes, planes, 1, norm)]
            in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class WideBlock(nn.Module):
    """Pre-activation wide-ResNet block (norm-ReLU-conv twice) with a 1x1 projection when needed."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str) -> None:
        super().__init__()
        self.bn1 = norm_layer(norm, in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm_layer(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WideResNet-depth-widen (Zagoruyko & Komodakis) for 32x32 inputs; depth = 6n + 4."""

    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10,
                 in_channels: int = 3, norm: str = "batch") -> None:
        super().__init__()
        _check_norm(norm, ("group", "batch"))
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"depth must be 6n + 4 with n >= 1, got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be >= 1, got {widen_factor}")
        blocks_per_group = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        layers: list[nn.Module] = []
        in_planes = widths[0]
        for planes, stride in zip(widths[1:], (1, 2, 2)):
            for i in range(blocks_per_group):
                layers.append(WideBlock(in_planes, planes, stride if i == 0 else 1, norm))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = norm_layer(norm, in_planes)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


MODELS = ("cnn", "resnet18", "wrn28-10", "wrn34-10")
DEFAULT_NORM = {"cnn": "none", "resnet18": "batch", "wrn28-10": "batch", "wrn34-10": "batch"}


def build_model(name: str, num_classes: int, in_channels: int, norm: str | None = None) -> nn.Module:
    """Build a model by name ("cnn", "resnet18", "wrn28-10", "wrn34-10").

    ``norm=None`` picks the architecture's usual default: "none" for the CNN, "batch" otherwise.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {list(MODELS)}")
    norm = DEFAULT_NORM[name] if norm is None else norm
    if name == "cnn":
        return SmallCNN(num_classes, in_channels, norm)
    if name == "resnet18":
        return ResNet18(num_classes, in_channels, norm)
    depth = 28 if name == "wrn28-10" else 34
    return WideResNet(depth, 10, num_classes, in_channels, norm)
