"""Train-time image augmentation as batch operations in pure torch (no torchvision).

The training loop calls an `Augment` once per batch, after the batch reached the device, and gives
the result to the student and the teacher alike. Every op maps a float batch (B, C, H, W) to a
float batch, draws its random parameters on the CPU with the given `torch.Generator` (so a seed
gives the same crops on CPU and GPU), moves those few numbers to the images' device, and treats
each image of the batch with its own random draw, without a Python loop over the batch.

    augment = build_augment([{"kind": "random_crop", "size": 32, "padding": 4}, {"kind": "hflip"}])
    images = augment(images, generator)  # (B, 3, 32, 32) -> (B, 3, 32, 32)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from distil.binding import bind_kwargs
from distil.errors import ConfigError, DataError, RecipeError, did_you_mean


class AugmentOp(Protocol):
    """One batch operation: (B, C, H, W) float images and a CPU generator in, a float batch out."""

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor: ...


def _check_images(images: Tensor, op: str) -> None:
    """Raise DataError unless `images` is a 4-D floating batch (B, C, H, W)."""
    if images.ndim != 4:
        raise DataError(f"{op}: image augmentation needs (B, C, H, W) batches, got shape {tuple(images.shape)}. "
                        "Remove data.augment for tabular (B, D) or signal (B, C, L) data.")
    if not images.is_floating_point():
        raise DataError(f"{op}: image augmentation needs a float batch, got {images.dtype}. "
                        "Convert the images to float (e.g. x / 255) before augmenting.")


def _to_device(values: Tensor, images: Tensor) -> Tensor:
    """Move CPU-drawn parameters next to `images`, without waiting for the copy."""
    return values.to(images.device, non_blocking=True)


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    """`n` draws from U(low, high) on the CPU, float32, shape (n,)."""
    return low + (high - low) * torch.rand(n, generator=generator)


@dataclass(frozen=True)
class RandomCrop:
    """Zero-pad every side by `padding`, then cut a random `size` x `size` window out of each image.

    (B, C, H, W) -> (B, C, size, size). The window's top-left corner is drawn per image, uniformly
    over the padded image (offsets in [0, H + 2*padding - size]). CIFAR's recipe: size 32, padding 4.
    """

    size: int
    padding: int = 0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise RecipeError(f"size: must be >= 1, got {self.size}.")
        if self.padding < 0:
            raise RecipeError(f"padding: must be >= 0, got {self.padding}.")

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        _check_images(images, "RandomCrop")
        padded = F.pad(images, (self.padding,) * 4) if self.padding else images  # (B, C, Hp, Wp)
        b, c, hp, wp = padded.shape
        if self.size > hp or self.size > wp:
            raise DataError(f"RandomCrop: crop size {self.size} is larger than the padded image {hp}x{wp} "
                            f"(image {images.shape[2]}x{images.shape[3]}, padding {self.padding}). "
                            "Lower size or raise padding.")
        top = _to_device(torch.randint(0, hp - self.size + 1, (b,), generator=generator), images)
        left = _to_device(torch.randint(0, wp - self.size + 1, (b,), generator=generator), images)
        steps = torch.arange(self.size, device=images.device)
        rows = (top[:, None] + steps)[:, None, :, None].expand(b, c, self.size, wp)  # (B, C, size, Wp)
        cols = (left[:, None] + steps)[:, None, None, :].expand(b, c, self.size, self.size)  # (B, C, size, size)
        return padded.gather(2, rows).gather(3, cols)  # (B, C, Hp, Wp) -> (B, C, size, Wp) -> (B, C, size, size)


@dataclass(frozen=True)
class HorizontalFlip:
    """Flip each image left-right with probability `p`, drawn per image. (B, C, H, W) -> same shape."""

    p: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise RecipeError(f"p: must be in [0, 1], got {self.p}.")

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        _check_images(images, "HorizontalFlip")
        flip = _to_device(torch.rand(images.shape[0], generator=generator) < self.p, images)  # (B,)
        return torch.where(flip[:, None, None, None], images.flip(-1), images)


@dataclass(frozen=True)
class RandomResizedCrop:
    """Cut a random box out of each image and resize it to `size` x `size` (bilinear).

    Per image: the box covers a fraction of the image area drawn from U(scale) and has a width/height
    ratio drawn log-uniformly from `ratio`; a box that does not fit is clamped to the image (no
    rejection loop), then placed uniformly. (B, C, H, W) -> (B, C, size, size), via `affine_grid`
    and `grid_sample(align_corners=False)`, so scale=(1, 1), ratio=(1, 1), size == H == W is the identity.
    """

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise RecipeError(f"size: must be >= 1, got {self.size}.")
        low, high = self.scale
        if not 0.0 < low <= high <= 1.0:
            raise RecipeError(f"scale: needs 0 < low <= high <= 1, got {tuple(self.scale)}.")
        low, high = self.ratio
        if not 0.0 < low <= high:
            raise RecipeError(f"ratio: needs 0 < low <= high, got {tuple(self.ratio)}.")

    def _boxes(self, b: int, h: int, w: int, generator: torch.Generator) -> Tensor:
        """Affine maps from output to input coordinates, one box per image, (B, 2, 3) float32 on the CPU."""
        area = _uniform(b, *self.scale, generator)  # fraction of H*W
        aspect = torch.exp(_uniform(b, math.log(self.ratio[0]), math.log(self.ratio[1]), generator))  # box w / h
        # box width / W and height / H, from w*h = area*H*W and w/h = aspect
        width = torch.sqrt(area * aspect * h / w).clamp(max=1.0)
        height = torch.sqrt(area * w / (aspect * h)).clamp(max=1.0)
        # centres in [-1, 1] grid coordinates, so that the box stays inside the image
        cx = (2 * torch.rand(b, generator=generator) - 1) * (1 - width)
        cy = (2 * torch.rand(b, generator=generator) - 1) * (1 - height)
        zero = torch.zeros(b)
        return torch.stack([torch.stack([width, zero, cx], 1), torch.stack([zero, height, cy], 1)], 1)

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        _check_images(images, "RandomResizedCrop")
        b, c, h, w = images.shape
        theta = self._boxes(b, h, w, generator).to(images.dtype)  # (B, 2, 3)
        grid = F.affine_grid(_to_device(theta, images), [b, c, self.size, self.size], align_corners=False)
        # border: the clamped box never leaves the image, this only guards rounding at its edges
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


@dataclass(frozen=True)
class Normalize:
    """`(x - mean) / std` per channel. (B, C, ...) -> same shape; mean and std have C entries."""

    mean: list[float]
    std: list[float]

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            raise RecipeError(f"mean and std: need one entry per channel each, got {len(self.mean)} means "
                              f"and {len(self.std)} stds.")
        if any(s <= 0 for s in self.std):
            raise RecipeError(f"std: every entry must be > 0, got {list(self.std)}.")

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        if images.ndim < 2 or images.shape[1] != len(self.mean):
            raise DataError(f"Normalize: mean/std have {len(self.mean)} channels but the batch of shape "
                            f"{tuple(images.shape)} has {images.shape[1] if images.ndim >= 2 else 'no'} "
                            "(dim 1). Give one mean and std per channel.")
        view = (1, -1) + (1,) * (images.ndim - 2)  # (C,) -> (1, C, 1, ...)
        mean = _to_device(torch.tensor(self.mean, dtype=images.dtype), images).view(view)
        std = _to_device(torch.tensor(self.std, dtype=images.dtype), images).view(view)
        return (images - mean) / std


class Augment:
    """Apply `ops` in order to a batch; an empty `Augment` is falsy and returns its input."""

    def __init__(self, ops: list[AugmentOp]) -> None:
        self.ops = list(ops)

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        if generator.device.type != "cpu":
            raise ConfigError(f"Augment: the generator must live on the CPU, got {generator.device}. "
                             "Pass torch.Generator() (parameters are drawn on the CPU, then moved).")
        for op in self.ops:
            images = op(images, generator)
        return images

    def __len__(self) -> int:
        return len(self.ops)

    def __bool__(self) -> bool:
        return bool(self.ops)

    def __repr__(self) -> str:
        return f"Augment([{', '.join(repr(op) for op in self.ops)}])"


AUGMENTS: dict[str, type] = {
    "random_crop": RandomCrop,
    "hflip": HorizontalFlip,
    "random_resized_crop": RandomResizedCrop,
    "normalize": Normalize,
}


def _build_op(spec: Any, where: str) -> AugmentOp:
    """One op from `{kind: ..., **options}`; errors name `where` (e.g. 'data.augment[0]')."""
    if not isinstance(spec, dict) or "kind" not in spec:
        raise RecipeError(f"{where}: an augmentation is a mapping with a 'kind' and its options, "
                          f"e.g. {{kind: random_crop, size: 32, padding: 4}}; got {spec!r}.")
    options = {k: v for k, v in spec.items() if k != "kind"}
    kind = spec["kind"]
    if kind not in AUGMENTS:
        raise RecipeError(f"{where}.kind: unknown augmentation '{kind}'." + did_you_mean(str(kind), AUGMENTS))
    cls = AUGMENTS[kind]
    kwargs = bind_kwargs(cls, options, f"{where} ({kind})")
    try:
        return cls(**kwargs)
    except RecipeError as err:
        raise RecipeError(f"{where}.{err}") from None


def build_augment(specs: list[dict], where: str = "data.augment") -> Augment:
    """An `Augment` from recipe specs like `[{kind: random_crop, size: 32, padding: 4}, {kind: hflip}]`."""
    if not isinstance(specs, list):
        raise RecipeError(f"{where}: expected a list of augmentations, got {type(specs).__name__}.")
    return Augment([_build_op(spec, f"{where}[{i}]") for i, spec in enumerate(specs)])
