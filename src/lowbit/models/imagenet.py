"""ImageNet-shaped models: AlexNet (optionally with BatchNorm), ResNet-18 and ResNet-50."""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model


class AlexNet(nn.Module):
    """Single-tower AlexNet (64-192-384-256-256 convs, 4096-4096 FC) for 224x224 inputs.

    With ``batchnorm=True`` every conv/FC except the classifier is followed by BatchNorm
    (no bias before BN), as in the binarized AlexNets of the QNN paper.
    """

    def __init__(
        self, num_classes: int, in_channels: int, batchnorm: bool, dropout: float
    ) -> None:
        super().__init__()

        def conv(cin: int, cout: int, k: int, s: int, p: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, s, p, bias=not batchnorm)]
            if batchnorm:
                layers.append(nn.BatchNorm2d(cout))
            return [*layers, nn.ReLU()]

        def fc(fin: int, fout: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
            layers.append(nn.Linear(fin, fout, bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm1d(fout))
            return [*layers, nn.ReLU()]

        self.features = nn.Sequential(
            *conv(in_channels, 64, 11, 4, 2), nn.MaxPool2d(3, 2),
            *conv(64, 192, 5, 1, 2), nn.MaxPool2d(3, 2),
            *conv(192, 384, 3, 1, 1),
            *conv(384, 256, 3, 1, 1),
            *conv(256, 256, 3, 1, 1), nn.MaxPool2d(3, 2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(6)
        self.classifier = nn.Sequential(
            *fc(256 * 6 * 6, 4096), *fc(4096, 4096), nn.Linear(4096, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


@register_model
def alexnet(
    num_classes: int = 1000, in_channels: int = 3, batchnorm: bool = False, dropout: float = 0.5
) -> nn.Module:
    """AlexNet for ImageNet shapes (~61.1M params at 1000 classes); ``batchnorm=True`` adds BN."""
    return AlexNet(num_classes, in_channels, batchnorm, dropout)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here, as in torchvision's "ResNet v1.5") -> 1x1 with expansion 4."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.downsample(x))


class Basic(nn.Module):
    """Two 3x3 convs; 1x1 conv + BN projection shortcut where the shape changes."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or cin != width:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, width, 1, stride, bias=False), nn.BatchNorm2d(width)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class ImageNetResNet(nn.Module):
    """ResNet with a 7x7/2 stem and max-pool, four stages of 64-128-256-512 widths."""

    def __init__(
        self,
        block: type[Basic] | type[Bottleneck],
        layers: list[int],
        num_classes: int,
        in_channels: int,
        zero_init_residual: bool,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        stages = []
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for m in self.modules():
                last = getattr(m, "bn3", None) if isinstance(m, Bottleneck) else (
                    getattr(m, "bn2", None) if isinstance(m, Basic) else None)
                if last is not None:
                    nn.init.zeros_(last.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model
def resnet18(
    num_classes: int = 1000, in_channels: int = 3, zero_init_residual: bool = False
) -> nn.Module:
    """ResNet-18 for ImageNet shapes (~11.7M params at 1000 classes)."""
    return ImageNetResNet(Basic, [2, 2, 2, 2], num_classes, in_channels, zero_init_residual)


@register_model
def resnet50(
    num_classes: int = 1000, in_channels: int = 3, zero_init_residual: bool = False
) -> nn.Module:
    """ResNet-50 for ImageNet shapes (~25.6M params at 1000 classes), stride in the 3x3 conv."""
    return ImageNetResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels, zero_init_residual)
