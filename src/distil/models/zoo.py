"""The model zoo: small models for demos and tests, and the CIFAR-style nets of the KD literature.

Every factory takes `(input_shape, num_classes, **knobs)`, where `input_shape` excludes the
batch dimension: (D,) tabular, (C, L) sequences, (C, H, W) images. Submodules are named
`layer1..layerN` and `fc` so feature taps read well in recipes.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from distil.errors import ModelError
from distil.models.gpt import gpt


def _need_rank(name: str, input_shape: tuple[int, ...], ranks: tuple[int, ...], hint: str) -> None:
    if len(input_shape) not in ranks:
        raise ModelError(
            f"model '{name}' needs inputs of rank {' or '.join(map(str, ranks))} (without batch), "
            f"but the data gives shape {list(input_shape)}. {hint}"
        )


def mlp(input_shape: tuple[int, ...], num_classes: int, width: int = 100, depth: int = 1) -> nn.Module:
    """Flatten, then `depth` hidden Linear+ReLU layers of `width` units (`layer1..`), then `fc`."""
    layers: dict[str, nn.Module] = {"flatten": nn.Flatten()}
    in_features = math.prod(input_shape)
    for i in range(depth):
        layers[f"layer{i + 1}"] = nn.Sequential(nn.Linear(in_features, width), nn.ReLU())
        in_features = width
    layers["fc"] = nn.Linear(in_features, num_classes)
    return nn.Sequential(OrderedDict(layers))


def cnn1d(input_shape: tuple[int, ...], num_classes: int, width: int = 64, depth: int = 3,
          kernel_size: int = 5) -> nn.Module:
    """1-D CNN: `depth` Conv1d+BN+ReLU blocks (`layer1..`; every block after the first halves the
    length), then global average and max pooling and `fc`. Input (C, L); (L,) is read as (1, L)."""
    _need_rank("cnn1d", input_shape, (1, 2), "Use 'cnn' for images or 'mlp' for tabular data.")
    channels = 1 if len(input_shape) == 1 else input_shape[0]
    layers: dict[str, nn.Module] = {}
    if len(input_shape) == 1:
        layers["unsqueeze"] = nn.Unflatten(1, (1, input_shape[0]))  # (B, L) -> (B, 1, L)
    for i in range(depth):
        stride = 1 if i == 0 else 2
        layers[f"layer{i + 1}"] = nn.Sequential(
            nn.Conv1d(channels, width, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
            nn.BatchNorm1d(width), nn.ReLU())
        channels = width
    layers["pool"] = _GlobalPool1d()
    layers["fc"] = nn.Linear(2 * width, num_classes)
    return nn.Sequential(OrderedDict(layers))


class _GlobalPool1d(nn.Module):
    """(B, C, L) -> (B, 2C): average and max over the length, concatenated."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=2), x.amax(dim=2)], dim=1)


def cnn(input_shape: tuple[int, ...], num_classes: int, width: int = 32, depth: int = 3) -> nn.Module:
    """2-D CNN: `depth` Conv3x3+BN+ReLU blocks (`layer1..`), each after the first doubling the
    width and halving the resolution, then global average pooling and `fc`. Input (C, H, W)."""
    _need_rank("cnn", input_shape, (3,), "Use 'cnn1d' for sequences or 'mlp' for tabular data.")
    channels, layers = input_shape[0], {}
    for i in range(depth):
        out = width * 2 ** i
        stride = 1 if i == 0 else 2
        layers[f"layer{i + 1}"] = nn.Sequential(
            nn.Conv2d(channels, out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU())
        channels = out
    layers["pool"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    layers["fc"] = nn.Linear(channels, num_classes)
    return nn.Sequential(OrderedDict(layers))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with a projection shortcut when the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def cifar_resnet(input_shape: tuple[int, ...], num_classes: int, depth: int = 8, width: int = 4) -> nn.Module:
    """CIFAR ResNet (He et al. 2016) as used by CRD and mdistiller: depth 6n+2, stages of
    (16, 32, 64) * width channels (resnet8x4 = depth 8, width 4). Input (C, H, W)."""
    _need_rank("resnet", input_shape, (3,), "ResNets take images (C, H, W).")
    if (depth - 2) % 6:
        raise ModelError(f"resnet depth must be 6n+2 (8, 14, 20, 32, ...), got {depth}")
    blocks, widths = (depth - 2) // 6, [16 * width, 32 * width, 64 * width]
    layers: dict[str, nn.Module] = {"stem": nn.Sequential(
        nn.Conv2d(input_shape[0], widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())}
    in_ch = widths[0]
    for stage, out_ch in enumerate(widths):
        stage_blocks = []
        for b in range(blocks):
            stage_blocks.append(BasicBlock(in_ch, out_ch, 2 if stage > 0 and b == 0 else 1))
            in_ch = out_ch
        layers[f"layer{stage + 1}"] = nn.Sequential(*stage_blocks)
    layers["pool"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    layers["fc"] = nn.Linear(in_ch, num_classes)
    return nn.Sequential(OrderedDict(layers))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project; residual when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_ch * expand
        self.residual = stride == 1 and in_ch == out_ch
        self.block = nn.Sequential(
            nn.Conv2d(in_ch, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


def mobilenetv2(input_shape: tuple[int, ...], num_classes: int, width: float = 1.0, expand: int = 6) -> nn.Module:
    """A small MobileNetV2 for 32x32-scale images: stem, four stages (`layer1..layer4`) of
    inverted residual blocks with (16, 24, 32, 64) * width channels, pooling and `fc`."""
    _need_rank("mobilenetv2", input_shape, (3,), "MobileNetV2 takes images (C, H, W).")
    stage_widths = [max(8, int(c * width)) for c in (16, 24, 32, 64)]
    stem = max(8, int(32 * width))
    layers: dict[str, nn.Module] = {"stem": nn.Sequential(
        nn.Conv2d(input_shape[0], stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU6())}
    in_ch = stem
    for i, out_ch in enumerate(stage_widths):
        stride = 1 if i == 0 else 2
        layers[f"layer{i + 1}"] = nn.Sequential(
            InvertedResidual(in_ch, out_ch, stride, 1 if i == 0 else expand),
            InvertedResidual(out_ch, out_ch, 1, expand))
        in_ch = out_ch
    layers["pool"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    layers["fc"] = nn.Linear(in_ch, num_classes)
    return nn.Sequential(OrderedDict(layers))


def _resnet(depth: int, width: int):
    def factory(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        return cifar_resnet(input_shape, num_classes, depth=depth, width=width)

    factory.__doc__ = f"CIFAR ResNet-{depth} with {width}x channels (see `cifar_resnet`)."
    return factory


MODELS = {
    "mlp": mlp,
    "gpt": gpt,
    "cnn": cnn,
    "cnn1d": cnn1d,
    "resnet": cifar_resnet,
    **{f"resnet{d}x4": _resnet(d, 4) for d in (8, 14, 20, 32)},
    **{f"resnet{d}": _resnet(d, 1) for d in (8, 14, 20, 32, 56, 110)},
    "mobilenetv2": mobilenetv2,
}
