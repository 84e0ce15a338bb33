"""The trainer's networks, in plain torch (no torchvision).

Every network takes ``image`` (float32, N x C x H x W, already preprocessed by
``services.runtime.preprocessing``) and returns ``(logits, embedding)``: logits N x K for the K labels,
and an embedding N x D (the input of the classifier layer) that the monitor compares between the reference
profile and live traffic.

- ``small_cnn``: four 3x3 conv stages of 16, 32, 64 and 128 channels (BatchNorm, ReLU, a 2x2 max-pool
  between stages) and global average pooling; about 106k parameters, trains on a CPU in seconds on 32x32
  digits. Images larger than 64 pixels get a strided stem so the cost stays small.
- ``resnet``: ResNet-18 (BasicBlocks 2-2-2-2, BatchNorm, global average pooling to 1x1 so any image size
  works). Images of 128 pixels and more get the ImageNet stem (7x7 stride 2 conv and max-pool); smaller ones
  the CIFAR stem (3x3 stride 1), so 32x32 inputs are not reduced to nothing.

Both script with ``torch.jit.script`` and export to ONNX. Global average pooling is written as a mean over H
and W: the same as adaptive pooling to 1x1, but its gradient is deterministic on CUDA (adaptive_avg_pool2d's
is not).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor, nn

__all__ = ["ARCHITECTURES", "Architecture", "ConveyorNet", "build_model"]

Architecture = Literal["small_cnn", "resnet"]
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class BasicBlock(nn.Module):
    """The ResNet-18 block: two 3x3 convs with BatchNorm and a shortcut (1x1 conv when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ConveyorNet(nn.Module):
    """A feature extractor, global average pooling, an embedding layer and a linear classifier.

    ``forward(image) -> (logits, embedding)``; the embedding is ReLU(Linear(pooled features)), and the logits
    are a linear function of it.
    """

    def __init__(
        self, features: nn.Module, feature_dim: int, num_classes: int, embedding_dim: int, dropout: float
    ) -> None:
        super().__init__()
        self.features = features
        self.embed = nn.Sequential(nn.Linear(feature_dim, embedding_dim), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(embedding_dim, num_classes)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        pooled = self.features(image).mean(dim=(2, 3))
        embedding = self.embed(pooled)
        logits = self.classifier(self.dropout(embedding))
        return logits, embedding


def _small_cnn(in_channels: int, image_size: int) -> tuple[nn.Module, int]:
    stem_stride = 2 if image_size > 64 else 1
    widths = (16, 32, 64, 128)
    features = nn.Sequential(
        _conv_bn_relu(in_channels, widths[0], stride=stem_stride),
        nn.MaxPool2d(2),
        _conv_bn_relu(widths[0], widths[1]),
        nn.MaxPool2d(2),
        _conv_bn_relu(widths[1], widths[2]),
        nn.MaxPool2d(2),
        _conv_bn_relu(widths[2], widths[3]),
    )
    return features, widths[3]


def _resnet18(in_channels: int, image_size: int) -> tuple[nn.Module, int]:
    if image_size >= 128:
        stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
    else:
        stem = _conv_bn_relu(in_channels, 64)
    layers: list[nn.Module] = [stem]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers), cin


def _init_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    # Zero the last BatchNorm of each residual branch: every block starts as the identity (Goyal et al.).
    for module in model.modules():
        if isinstance(module, BasicBlock):
            nn.init.zeros_(module.bn2.weight)


def build_model(
    architecture: str,
    in_channels: int,
    num_classes: int,
    image_size: int,
    embedding_dim: int = 64,
    *,
    seed: int | None = 0,
) -> nn.Module:
    """A freshly initialised network (in train mode, on the CPU) for ``architecture`` (small_cnn or resnet).

    ``seed`` makes the initial weights reproducible without touching the global RNG (None: draw from it);
    pass the policy's seed so a rerun starts from the same weights.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be at least 1, got {in_channels}")
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    if embedding_dim < 1:
        raise ValueError(f"embedding_dim must be at least 1, got {embedding_dim}")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if architecture == "small_cnn":
            features, feature_dim = _small_cnn(in_channels, image_size)
            model = ConveyorNet(features, feature_dim, num_classes, embedding_dim, dropout=0.1)
        else:
            features, feature_dim = _resnet18(in_channels, image_size)
            model = ConveyorNet(features, feature_dim, num_classes, embedding_dim, dropout=0.0)
        _init_weights(model)
    return model
