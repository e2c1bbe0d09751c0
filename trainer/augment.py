"""DINO's multi-crop augmentation, applied to whole batches of tensors on the training device.

Per-image PIL/torchvision pipelines cost a Python round trip per image per crop; on a small CPU that
alone caps training at a few dozen images a second. Here every operation draws its random parameters
for the whole batch at once and applies them with one tensor op: random resized crops through
`torchvision.ops.roi_align` (one bilinear resample of per-image boxes), flips, colour jitter and
grayscale as per-image factors, Gaussian blur as one grouped convolution with a per-image kernel,
solarization as a masked select. The probabilities follow DINO's `DataAugmentationDINO`: blur 1.0 on
the first global view, 0.1 on the second and 0.5 on local views; solarization 0.2 on the second global
view; colour jitter (0.4, 0.4, 0.2) with p=0.8 and grayscale with p=0.2. Hue jitter is left out (it
needs an HSV round trip for little effect on these images).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from trainer.config import AugmentConfig, CropsConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MultiCrop:
    """Turns a uint8 batch `[B, 3, H, W]` into the list of views: global crops first, then local crops."""

    def __init__(self, crops: CropsConfig, augment: AugmentConfig, device: torch.device):
        self.crops, self.aug, self.device = crops, augment, device
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        x = self._unit(images)
        c = self.crops
        views = self._globals(x, c.global_crops, generator)
        for _ in range(c.local_crops):
            views.append(self._view(x, c.local_size, c.local_scale, 0.5, 0.0, generator))
        return views

    def global_views(self, images: torch.Tensor, count: int, generator: torch.Generator) -> list[torch.Tensor]:
        """`count` global views of a uint8 batch, augmented as in training."""
        return self._globals(self._unit(images), count, generator)

    def _unit(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> floats in [0, 1] on the training device."""
        return images.to(self.device, non_blocking=True).float().div_(255.0)

    def _globals(self, x: torch.Tensor, count: int, g: torch.Generator) -> list[torch.Tensor]:
        c = self.crops
        # blur always on the first global view, rarely on the second; solarization on the second only
        return [self._view(x, c.global_size, c.global_scale, 1.0 if i == 0 else 0.1, 0.2 if i == 1 else 0.0, g)
                for i in range(count)]

    def plain(self, images: torch.Tensor, size: int) -> torch.Tensor:
        """Evaluation view: resize to `size` and normalize, no randomness."""
        x = self._unit(images)
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return (x - self.mean) / self.std

    def _view(self, x, size, scale, blur_p, solar_p, g) -> torch.Tensor:
        v = random_resized_crop(x, size, scale, g)
        a = self.aug
        if a.flip:
            flip = _coin(v.shape[0], 0.5, g, v.device)
            v = torch.where(flip[:, None, None, None], v.flip(-1), v)
        if a.color_jitter:
            v = color_jitter(v, g, p=0.8)
            v = random_grayscale(v, g, p=0.2)
        if a.blur and blur_p > 0:
            v = gaussian_blur(v, g, p=blur_p)
        if a.solarization and solar_p > 0:
            sol = _coin(v.shape[0], solar_p, g, v.device)[:, None, None, None]
            v = torch.where(sol & (v >= 0.5), 1.0 - v, v)
        return (v - self.mean) / self.std


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device) -> torch.Tensor:
    return (torch.rand(n, generator=g) * (hi - lo) + lo).to(device)


def _coin(n: int, p: float, g: torch.Generator, device) -> torch.Tensor:
    return (torch.rand(n, generator=g) < p).to(device)


def random_resized_crop(x: torch.Tensor, size: int, scale: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    """Per-image random area fraction in `scale` and aspect ratio in [3/4, 4/3], resampled to `size`."""
    b, _, h, w = x.shape
    area = torch.rand(b, generator=g) * (scale[1] - scale[0]) + scale[0]
    log_ratio = torch.rand(b, generator=g) * (math.log(4 / 3) - math.log(3 / 4)) + math.log(3 / 4)
    ratio = torch.exp(log_ratio)
    cw = torch.sqrt(area * ratio).clamp(max=1.0) * w
    ch = torch.sqrt(area / ratio).clamp(max=1.0) * h
    x0 = torch.rand(b, generator=g) * (w - cw)
    y0 = torch.rand(b, generator=g) * (h - ch)
    boxes = torch.stack([torch.arange(b, dtype=torch.float32), x0, y0, x0 + cw, y0 + ch], dim=1).to(x.device, x.dtype)
    return roi_align(x, boxes, output_size=(size, size), spatial_scale=1.0, sampling_ratio=2, aligned=True)


def color_jitter(v: torch.Tensor, g: torch.Generator, p: float) -> torch.Tensor:
    """Brightness 0.4, contrast 0.4, saturation 0.2, each a per-image factor, applied with probability p."""
    b, dev = v.shape[0], v.device
    apply = _coin(b, p, g, dev)[:, None, None, None]
    bright = _uniform(b, 0.6, 1.4, g, dev)[:, None, None, None]
    contrast = _uniform(b, 0.6, 1.4, g, dev)[:, None, None, None]
    sat = _uniform(b, 0.8, 1.2, g, dev)[:, None, None, None]
    out = (v * bright).clamp_(0, 1)
    gray = _luma(out)
    out = (gray.mean(dim=(2, 3), keepdim=True) * (1 - contrast) + out * contrast).clamp_(0, 1)
    gray = _luma(out)
    out = (gray * (1 - sat) + out * sat).clamp_(0, 1)
    return torch.where(apply, out, v)


def random_grayscale(v: torch.Tensor, g: torch.Generator, p: float) -> torch.Tensor:
    """Replace an image by its luma in all three channels with probability p."""
    apply = _coin(v.shape[0], p, g, v.device)[:, None, None, None]
    return torch.where(apply, _luma(v).expand_as(v), v)


def _luma(v: torch.Tensor) -> torch.Tensor:
    return (0.299 * v[:, 0:1] + 0.587 * v[:, 1:2] + 0.114 * v[:, 2:3])


def gaussian_blur(v: torch.Tensor, g: torch.Generator, p: float) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma in [0.1, 2.0] (scaled to the crop), probability p.

    One grouped convolution blurs the whole batch: each (image, channel) plane is its own group with its
    own kernel, so the batch costs two convolution calls whatever its size.
    """
    b, c, h, w = v.shape
    apply = _coin(b, p, g, v.device)
    # DINO blurs 224 px crops with sigma in [0.1, 2]; keep the same blur relative to the crop size.
    sigma = _uniform(b, 0.1, 2.0, g, v.device) * (h / 224.0) * 4.0
    radius = max(1, int(math.ceil(2 * float(sigma.max()))))
    radius = min(radius, (min(h, w) - 1) // 2) or 1
    taps = torch.arange(-radius, radius + 1, device=v.device, dtype=v.dtype)
    kernel = torch.exp(-(taps[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    kernel = kernel.repeat_interleave(c, dim=0)  # [B*C, K]
    planes = v.reshape(1, b * c, h, w)
    planes = F.pad(planes, (radius, radius, radius, radius), mode="reflect")
    planes = F.conv2d(planes, kernel[:, None, None, :], groups=b * c)
    planes = F.conv2d(planes, kernel[:, None, :, None], groups=b * c)
    blurred = planes.reshape(b, c, h, w)
    return torch.where(apply[:, None, None, None], blurred, v)
