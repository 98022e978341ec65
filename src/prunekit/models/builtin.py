"""Built-in CIFAR-style models: ResNet-20/32/56/110, ResNet-18, VGG-11/16/19-BN, MobileNetV2, SmallCNN.

timm style: one small entry function per variant, all built by one shared builder per family. Every model takes
``in_channels`` and ``num_classes`` and runs on 16x16 to 32x32 (and larger) inputs with 1 or 3 channels.

Conventions that the pruning and statistics code relies on:
  * one activation module per activation point (no shared ``self.relu`` called twice), so a forward hook on an
    activation sees exactly one tensor per forward;
  * conventional names: ``conv1``/``bn1``/``layer1.0.conv1``/``layer1.0.downsample.0``/``fc`` (ResNets),
    ``features.N``/``classifier`` (VGG, MobileNetV2, SmallCNN);
  * downsampling shortcuts are 1x1 conv + BN (option B), which torch-pruning couples with the block output.

Example:
    >>> model = prunekit.create_model("resnet20", in_channels=1, num_classes=10)
    >>> model(torch.randn(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from prunekit.errors import ConfigError
from prunekit.models import register_model

DEFAULT_IMAGE_SIZE = 32  # input_spec of built-ins: [1, C, 32, 32] (training stages overwrite it with the dataset's)


def check_io(name: str, in_channels: Any, num_classes: Any) -> None:
    """``ConfigError`` unless ``in_channels`` and ``num_classes`` are positive integers."""
    for flag, v in (("--in-channels", in_channels), ("--num-classes", num_classes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{flag}: must be a positive integer for model {name!r}, got {v!r}")


def _check_kwargs(name: str, kwargs: dict[str, Any], in_channels: Any = 3, num_classes: Any = 10) -> None:
    check_io(name, in_channels, num_classes)
    if kwargs:
        raise ConfigError(f"model {name!r} does not take {', '.join(sorted(kwargs))}; "
                          f"built-in models take in_channels, num_classes (and width for smallcnn)")


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------- ResNets
class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, + identity (or 1x1 conv + BN when the shape changes), then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class ResNet(nn.Module):
    """ResNet with a 3x3 stride-1 stem and no max-pool; stage ``i`` has ``depths[i]`` blocks of ``widths[i]``."""

    def __init__(self, depths: Sequence[int], widths: Sequence[int], in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_planes = widths[0]
        for i, (depth, width) in enumerate(zip(depths, widths)):
            blocks = []
            for j in range(depth):
                blocks.append(BasicBlock(in_planes, width, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(depths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (B, w0, H, W)
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)  # (B, w_i, H / 2^i, W / 2^i)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def _cifar_resnet(depth: int, in_channels: int, num_classes: int, kwargs: dict[str, Any]) -> ResNet:
    _check_kwargs(f"resnet{depth}", kwargs, in_channels, num_classes)
    n = (depth - 2) // 6  # 6n + 2 layers: 3 stages of n blocks of 2 convs
    return ResNet([n, n, n], [16, 32, 64], in_channels, num_classes)


@register_model("resnet20", family="resnet", description="CIFAR-style ResNet-20 (16-64 channels, 0.27 M params)")
def resnet20(in_channels: int = 3, num_classes: int = 10, **kwargs: Any) -> ResNet:
    """CIFAR ResNet-20 (0.27 M params)."""
    return _cifar_resnet(20, in_channels, num_classes, kwargs)


@register_model("resnet32", family="resnet", description="CIFAR-style ResNet-32 (0.46 M params)")
def resnet32(in_channels: int = 3, num_classes: int = 10, **kwargs: Any) -> ResNet:
    """CIFAR ResNet-32 (0.46 M params)."""
    return _cifar_resnet(32, in_channels, num_classes, kwargs)


@register_model("resnet56", family="resnet", description="CIFAR-style ResNet-56 (0.85 M params)")
def resnet56(in_channels: int = 3, num_classes: int = 10, **kwargs: Any) -> ResNet:
    """CIFAR ResNet-56 (0.85 M params)."""
    return _cifar_resnet(56, in_channels, num_classes, kwargs)


@register_model("resnet110", family="resnet", description="CIFAR-style ResNet-110 (1.7 M params)")
def resnet110(in_channels: int = 3, num_classes: int = 10, **kwargs: Any) -> ResNet:
    """CIFAR ResNet-110 (1.7 M params)."""
    return _cifar_resnet(110, in_channels, num_classes, kwargs)


@register_model("resnet18", family="resnet", description="ResNet-18 with a 3x3 stem (11.2 M params)")
def resnet18(in_channels: int = 3, num_classes: int = 10, **kwargs: Any) -> ResNet:
    """ResNet-18 with a 3x3 stride-1 stem and no max-pool (the usual CIFAR variant, 11 M params)."""
    _check_kwargs("resnet18", kwargs, in_channels, num_classes)
    return ResNet([2, 2, 2, 2], [64, 128, 256, 512], in_channels, num_classes)


# ----------------------------------------------------------------------------------------------- VGG
_VGG_CFGS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG with BatchNorm; ``features.N`` (conv, BN, ReLU, max-pool), then global average pool + ``classifier``.

    Max-pools use ``ceil_mode=True``, so a 1x1 map stays 1x1 (16 px inputs go through all five pools) while
    32 px inputs give the usual 16-8-4-2-1 maps.
    """

    def __init__(self, cfg: Sequence[int | str], in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                c_out = int(v)
                layers += [nn.Conv2d(c, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
                c = c_out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)  # (B, 512)
        return self.classifier(x)


def _vgg(depth: int, in_channels: int, num_classes: int, kwargs: dict[str, Any]) -> VGG:
    _check_kwargs(f"vgg{depth}", kwargs, in_channels, num_classes)
    return VGG(_VGG_CFGS[depth], in_channels, num_classes)


@register_model("vgg11", family="vgg", description="VGG-11 with BatchNorm, CIFAR-style head (9.2 M params)")
def vgg11(in_channels: int = 3, num_classes: int = 10, **kwargs: Any) -> VGG:
    """VGG-11 with BatchNorm, CIFAR style (9.2 M params)."""
    return _vgg(11, in_channels, num_classes, kwargs)


@register_model("vgg16", family="vgg", description="VGG-16 with BatchNorm (14.7 M params)")
def vgg16(in_channels: int = 3, num_classes: int = 10, **kwargs: Any) -> VGG:
    """VGG-16 with BatchNorm, CIFAR style (14.7 M params)."""
    return _vgg(16, in_channels, num_classes, kwargs)


@register_model("vgg19", family="vgg", description="VGG-19 with BatchNorm (20.0 M params)")
def vgg19(in_channels: int = 3, num_classes: int = 10, **kwargs: Any) -> VGG:
    """VGG-19 with BatchNorm, CIFAR style (20 M params)."""
    return _vgg(19, in_channels, num_classes, kwargs)


# ----------------------------------------------------------------------------------------------- MobileNetV2
def _conv_bn_act(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """conv-BN-ReLU6 as ``0``/``1``/``2`` (torchvision's Conv2dNormActivation layout)."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expand (ReLU6) -> 3x3 depthwise (ReLU6) -> 1x1 linear projection, + identity when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = cin * expand_ratio
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_act(cin, hidden, 1))
        layers += [_conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


# (expand ratio t, channels c, repeats n, first stride s); CIFAR variant: stem and the 24-channel stage at stride 1
_MBV2_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                  (6, 320, 1, 1)]


class MobileNetV2(nn.Module):
    """MobileNetV2 for small images: ``features.0`` stem (stride 1), ``features.1..17`` blocks, ``features.18``
    1x1 conv to 1280, global average pool, ``classifier``."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, last_channels: int = 1280):
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_act(in_channels, 32, 3, 1)]
        c = 32
        for t, cout, n, s in _MBV2_SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(c, cout, s if i == 0 else 1, t))
                c = cout
        layers.append(_conv_bn_act(c, last_channels, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Linear(last_channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)  # (B, 1280)
        return self.classifier(self.dropout(x))


@register_model("mobilenetv2", family="mobilenet", description="MobileNetV2 for small images (2.2 M params)")
def mobilenetv2(in_channels: int = 3, num_classes: int = 10, **kwargs: Any) -> MobileNetV2:
    """MobileNetV2, CIFAR variant (stride-1 stem, 2.2 M params)."""
    _check_kwargs("mobilenetv2", kwargs, in_channels, num_classes)
    return MobileNetV2(in_channels, num_classes)


# ----------------------------------------------------------------------------------------------- SmallCNN
class SmallCNN(nn.Module):
    """Four conv-BN-ReLU layers (``features.N``), two max-pools, global average pool and ``classifier``: fast."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 32):
        super().__init__()
        w = width
        layers: list[nn.Module] = []
        for cin, cout, pool in [(in_channels, w, False), (w, w, True), (w, 2 * w, False), (2 * w, 2 * w, True)]:
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            if pool:
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * w, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)  # (B, 2 * width)
        return self.classifier(x)


@register_model("smallcnn", family="smallcnn", description="a small CNN (66 K params at width 32) for quick tests")
def smallcnn(in_channels: int = 3, num_classes: int = 10, width: int = 32, **kwargs: Any) -> SmallCNN:
    """A small CNN (about 65 K params at width 32) for quick tests and the digits default."""
    _check_kwargs("smallcnn", kwargs, in_channels, num_classes)
    if not isinstance(width, int) or width < 1:
        raise ConfigError(f"model 'smallcnn': width must be a positive integer, got {width!r}")
    return SmallCNN(in_channels, num_classes, width)
