"""Batched multi-crop augmentation: view count and shapes, determinism per generator seed, finite values,
and crops that stay inside the image they were cut from."""

from __future__ import annotations

import pytest
import torch

from trainer.augment import IMAGENET_MEAN, IMAGENET_STD, MultiCrop, random_resized_crop
from trainer.config import AugmentConfig, CropsConfig

from trainer_tiny import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def _images(b: int = 6, size: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize("n_global,n_local", [(2, 0), (2, 6), (1, 3)])
def test_views_come_globals_first_with_configured_sizes(n_global, n_local):
    crops = CropsConfig(global_crops=n_global, local_crops=n_local, global_size=24, local_size=12)
    views = MultiCrop(crops, AugmentConfig(), CPU)(_images(), torch.Generator().manual_seed(0))
    assert len(views) == n_global + n_local
    assert [tuple(v.shape) for v in views] == [(6, 3, 24, 24)] * n_global + [(6, 3, 12, 12)] * n_local
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in views)


def test_same_generator_seed_gives_identical_views_and_another_seed_does_not():
    mc = MultiCrop(CropsConfig(local_crops=4), AugmentConfig(), CPU)
    images = _images()
    a = mc(images, torch.Generator().manual_seed(7))
    b = mc(images, torch.Generator().manual_seed(7))
    c = mc(images, torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(not torch.equal(x, z) for x, z in zip(a, c))


def test_views_of_one_image_differ_from_each_other():
    views = MultiCrop(CropsConfig(global_crops=2, local_crops=0), AugmentConfig(), CPU)(_images(), torch.Generator().manual_seed(0))
    assert (views[0] - views[1]).abs().mean() > 0.1


def test_values_stay_in_the_normalized_unit_range():
    views = MultiCrop(CropsConfig(local_crops=6), AugmentConfig(), CPU)(_images(b=16), torch.Generator().manual_seed(1))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for v in views:
        pixels = v * std + mean  # undo the normalization
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_constant_image_stays_constant_after_crop_flip_and_colour_ops():
    """Every pixel of a crop of a constant image is that constant (bilinear weights sum to one, the blur kernel
    too, flips and per-image colour ops act on every pixel alike): no sample falls outside the image."""
    images = torch.zeros(5, 3, 32, 32, dtype=torch.uint8)
    images[:, 0], images[:, 1], images[:, 2] = 200, 90, 30
    crops = CropsConfig(global_crops=2, local_crops=4, global_size=24, local_size=12)
    plain = MultiCrop(crops, AugmentConfig(color_jitter=False, blur=False, solarization=False), CPU)
    expected = (torch.tensor([200, 90, 30]) / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    for v in plain(images, torch.Generator().manual_seed(0)):
        torch.testing.assert_close(v, expected.view(1, 3, 1, 1).expand_as(v), rtol=0, atol=1e-5)
    for v in MultiCrop(crops, AugmentConfig(), CPU)(images, torch.Generator().manual_seed(0)):
        assert v.amax(dim=(2, 3)).sub(v.amin(dim=(2, 3))).max() < 1e-5  # still one colour per image


def test_random_resized_crop_covers_an_area_within_the_scale_range_inside_the_image():
    """On a coordinate image (channel 0 = x, channel 1 = y, both in [0, 1]) a crop's values show where it was cut."""
    size, b, scale = 64, 200, (0.2, 0.6)
    coords = torch.linspace(0, 1, size)
    image = torch.stack([coords.view(1, -1).expand(size, size), coords.view(-1, 1).expand(size, size),
                         torch.zeros(size, size)])
    crops = random_resized_crop(image.expand(b, 3, size, size).contiguous(), 16, scale, torch.Generator().manual_seed(0))
    x, y = crops[:, 0], crops[:, 1]
    assert x.min() >= 0 and x.max() <= 1 and y.min() >= 0 and y.max() <= 1
    # Axis-aligned, unflipped: x grows along the width and y along the height of every crop.
    assert (x[:, :, 1:] >= x[:, :, :-1] - 1e-6).all() and (y[:, 1:, :] >= y[:, :-1, :] - 1e-6).all()
    # Extent covered, from the first to the last sample centre, plus one sample spacing: the crop's side.
    width = (x[:, 0, -1] - x[:, 0, 0]) * 16 / 15
    height = (y[:, -1, 0] - y[:, 0, 0]) * 16 / 15
    area = width * height
    assert area.min() >= scale[0] * 0.9 and area.max() <= scale[1] * 1.1
    assert area.max() - area.min() > 0.2  # the scale range is really sampled


def test_plain_evaluation_view_is_deterministic_and_resized():
    mc = MultiCrop(CropsConfig(), AugmentConfig(), CPU)
    images = _images(size=40)
    a, b = mc.plain(images, 32), mc.plain(images, 32)
    assert tuple(a.shape) == (6, 3, 32, 32) and torch.equal(a, b)
