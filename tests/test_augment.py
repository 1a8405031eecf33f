"""Batch augmentation: crops, flips, resized crops and normalisation against hand-computed results."""

import pytest
import torch
import torch.nn.functional as F

from distil.augment import AUGMENTS, Augment, HorizontalFlip, Normalize, RandomCrop, RandomResizedCrop, build_augment
from distil.errors import DataError, RecipeError


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _distinct(b: int = 8, c: int = 3, h: int = 32, w: int = 32) -> torch.Tensor:
    """Images whose every pixel value is unique, so a crop's offset can be recovered."""
    return torch.arange(b * c * h * w, dtype=torch.float32).reshape(b, c, h, w) + 1.0


def _crop_offsets(images: torch.Tensor, out: torch.Tensor, padding: int) -> list[tuple[int, int]]:
    """For each image, the (top, left) of the zero-padded image's window equal to the output (brute force)."""
    size = out.shape[-1]
    offsets = []
    for img, crop in zip(images, out):
        padded = torch.zeros(img.shape[0], img.shape[1] + 2 * padding, img.shape[2] + 2 * padding)
        padded[:, padding:padding + img.shape[1], padding:padding + img.shape[2]] = img
        found = [(top, left) for top in range(padded.shape[1] - size + 1) for left in range(padded.shape[2] - size + 1)
                 if torch.equal(padded[:, top:top + size, left:left + size], crop)]
        assert len(found) == 1, "output is not a crop of the padded image"
        offsets.append(found[0])
    return offsets


def test_random_crop_without_padding_at_full_size_is_identity():
    images = torch.rand(4, 3, 16, 16)
    assert torch.equal(RandomCrop(16)(images, _gen()), images)


def test_random_crop_is_a_window_of_the_padded_image_with_per_sample_offsets():
    images = _distinct()
    out = RandomCrop(32, padding=4)(images, _gen(0))
    assert out.shape == (8, 3, 32, 32)
    offsets = _crop_offsets(images, out, padding=4)
    assert all(0 <= top <= 8 and 0 <= left <= 8 for top, left in offsets)
    assert len({top for top, _ in offsets}) > 1 and len({left for _, left in offsets}) > 1, "images share a crop offset"
    other = _crop_offsets(images, RandomCrop(32, padding=4)(images, _gen(1)), padding=4)
    assert other != offsets


def test_random_crop_smaller_than_image():
    images = _distinct(b=4, c=1, h=10, w=12)
    out = RandomCrop(6)(images, _gen(3))
    assert out.shape == (4, 1, 6, 6)
    for top, left in _crop_offsets(images, out, padding=0):
        assert 0 <= top <= 4 and 0 <= left <= 6


def test_random_crop_larger_than_padded_image_names_both_sizes():
    with pytest.raises(DataError, match=r"crop size 40 .* padded image 36x36"):
        RandomCrop(40, padding=2)(torch.rand(2, 3, 32, 32), _gen())


def test_horizontal_flip_p1_p0_and_half():
    images = torch.rand(64, 3, 8, 8)
    assert torch.equal(HorizontalFlip(p=1.0)(images, _gen()), images.flip(-1))
    assert torch.equal(HorizontalFlip(p=0.0)(images, _gen()), images)
    out = HorizontalFlip(p=0.5)(images, _gen())
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, images)]
    kept = [torch.equal(o, i) for o, i in zip(out, images)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 0 < sum(flipped) < 64


def test_random_resized_crop_full_box_is_identity():
    images = torch.rand(5, 3, 16, 16)
    out = RandomResizedCrop(16, scale=(1.0, 1.0), ratio=(1.0, 1.0))(images, _gen())
    torch.testing.assert_close(out, images, atol=1e-5, rtol=0)


@pytest.mark.parametrize("wide", [True, False], ids=["16x32", "32x16"])
def test_random_resized_crop_aspect_is_in_pixels_on_non_square_images(wide):
    # full area at width/height = the image's own aspect is the whole image; squeezed to 16x16 with
    # align_corners=False, output pixel j samples input 2j + 0.5 along the long side: the mean of 2j and 2j+1
    shape, ratio = ((3, 2, 16, 32), 2.0) if wide else ((3, 2, 32, 16), 0.5)
    images = torch.rand(*shape)
    out = RandomResizedCrop(16, scale=(1.0, 1.0), ratio=(ratio, ratio))(images, _gen())
    if wide:
        expected = (images[..., 0::2] + images[..., 1::2]) / 2  # (3, 2, 16, 32) -> (3, 2, 16, 16)
    else:
        expected = (images[..., 0::2, :] + images[..., 1::2, :]) / 2  # (3, 2, 32, 16) -> (3, 2, 16, 16)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_random_resized_crop_shape_and_values_within_input_range():
    images = torch.rand(6, 3, 32, 24)
    out = RandomResizedCrop(20)(images, _gen(2))
    assert out.shape == (6, 3, 20, 20)
    assert out.min() >= images.min() - 1e-6 and out.max() <= images.max() + 1e-6


@pytest.mark.parametrize("axis", [-1, -2], ids=["left-right", "top-bottom"])
def test_random_resized_crop_of_two_halves_places_small_boxes_per_sample(axis):
    # one half 0, the other 1: a small box lies inside one half (a near-constant crop), and the
    # per-sample placement puts some boxes in each half
    images = torch.zeros(32, 1, 16, 16)
    images.narrow(axis, 8, 8).fill_(1.0)
    means = RandomResizedCrop(8, scale=(0.01, 0.02))(images, _gen(0)).mean(dim=(1, 2, 3))
    assert (means < 0.1).any() and (means > 0.9).any()


def test_normalize_matches_hand_arithmetic():
    images = torch.tensor([[[[0.0, 1.0]], [[0.5, 0.25]]]])  # (1, 2, 1, 2)
    out = Normalize(mean=[0.5, 0.25], std=[0.5, 0.25])(images, _gen())
    expected = torch.tensor([[[[-1.0, 1.0]], [[1.0, 0.0]]]])  # (0-.5)/.5, (1-.5)/.5; (.5-.25)/.25, 0
    torch.testing.assert_close(out, expected)


def test_normalize_channel_count_mismatch_and_bad_std():
    with pytest.raises(DataError, match=r"3 channels .* \(2, 1, 4, 4\) has 1"):
        Normalize([0.1, 0.2, 0.3], [1.0, 1.0, 1.0])(torch.rand(2, 1, 4, 4), _gen())
    with pytest.raises(RecipeError, match="std: every entry must be > 0"):
        Normalize([0.0], [0.0])
    with pytest.raises(RecipeError, match="2 means and 1 stds"):
        Normalize([0.0, 0.0], [1.0])


def test_same_seed_same_output_other_seed_differs():
    augment = build_augment([{"kind": "random_crop", "size": 32, "padding": 4}, {"kind": "hflip"},
                             {"kind": "random_resized_crop", "size": 24}])
    images = torch.rand(16, 3, 32, 32)
    first, again = augment(images, _gen(7)), augment(images, _gen(7))
    assert first.shape == (16, 3, 24, 24)
    assert torch.equal(first, again)
    assert not torch.equal(first, augment(images, _gen(8)))


def test_augment_compose_len_bool_repr():
    augment = Augment([HorizontalFlip(p=1.0), Normalize([1.0], [2.0])])
    images = torch.rand(2, 1, 3, 3)
    torch.testing.assert_close(augment(images, _gen()), (images.flip(-1) - 1.0) / 2.0)
    assert len(augment) == 2 and augment
    assert not Augment([]) and len(Augment([])) == 0
    assert "HorizontalFlip(p=1.0)" in repr(augment) and "Normalize(" in repr(augment)
    assert torch.equal(Augment([])(images, _gen()), images)


def test_build_augment_makes_registered_ops():
    augment = build_augment([{"kind": "random_crop", "size": 32, "padding": 4}, {"kind": "hflip", "p": 0.25},
                             {"kind": "random_resized_crop", "size": 8, "scale": [0.5, 1.0]},
                             {"kind": "normalize", "mean": [0.5], "std": [0.2]}])
    assert [type(op) for op in augment.ops] == [RandomCrop, HorizontalFlip, RandomResizedCrop, Normalize]
    assert augment.ops[0] == RandomCrop(32, 4) and augment.ops[1].p == 0.25
    assert augment.ops[2].scale == (0.5, 1.0)
    assert set(AUGMENTS) == {"random_crop", "hflip", "random_resized_crop", "normalize"}


def test_build_augment_unknown_kind_suggests_nearest():
    with pytest.raises(RecipeError, match=r"data\.augment\[1\]\.kind: unknown augmentation 'random_crp'\. "
                                          r"Did you mean 'random_crop'"):
        build_augment([{"kind": "hflip"}, {"kind": "random_crp", "size": 32}])


def test_build_augment_unknown_option_is_named():
    with pytest.raises(RecipeError, match=r"data\.augment\[0\] \(random_crop\).*unknown option 'pad'"):
        build_augment([{"kind": "random_crop", "size": 32, "pad": 4}])


def test_build_augment_bad_value_names_the_field():
    with pytest.raises(RecipeError, match=r"aug\[0\]\.p: must be in \[0, 1\]"):
        build_augment([{"kind": "hflip", "p": 1.5}], where="aug")
    with pytest.raises(RecipeError, match=r"data\.augment\[0\]: an augmentation is a mapping with a 'kind'"):
        build_augment([{"size": 32}])


@pytest.mark.parametrize("op", [RandomCrop(8), HorizontalFlip(), RandomResizedCrop(8)], ids=repr)
@pytest.mark.parametrize("shape", [(4, 10), (4, 2, 40)])
def test_wrong_rank_input_is_refused(op, shape):
    with pytest.raises(DataError, match=r"needs \(B, C, H, W\) batches, got shape " + str(shape).replace("(", r"\(")
                       .replace(")", r"\)")):
        op(torch.rand(*shape), _gen())


def test_padding_matches_plain_pytorch_crop():
    # parity: with padding p, the crop at the recovered offset equals F.pad + slicing
    images = _distinct(b=3, c=2, h=8, w=8)
    out = RandomCrop(8, padding=2)(images, _gen(5))
    padded = F.pad(images, (2, 2, 2, 2))
    for i, (top, left) in enumerate(_crop_offsets(images, out, padding=2)):
        assert torch.equal(out[i], padded[i, :, top:top + 8, left:left + 8])
