"""Data sets as uint8 image tensors of one fixed size, plus labels for the kNN evaluation.

Every data set here yields raw `uint8` images `[3, S, S]`; the multi-crop augmentation runs later on
whole batches on the training device (`trainer.augment`), so the DataLoader only moves pixels. That
keeps the input pipeline cheap on a CPU and leaves `num_workers` a real knob where decoding costs
(`imagefolder`, `stl10`).

The embedded default, ``digits``, is scikit-learn's 1,797 8x8 digits, each drawn at a random scale and
position on a noisy, coloured canvas with distractor strokes. Plain digits are too easy (weighted kNN
on raw pixels: 98%); on canvases the digit must be found among clutter, which gives a representation
something to learn. Canvases are deterministic from `data.split_seed`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from trainer.config import ConfigError, DataConfig


@dataclass
class Splits:
    """Training images (what the model trains on and the kNN bank) and validation images (kNN queries)."""

    train: Dataset
    train_labels: torch.Tensor
    val: Dataset
    val_labels: torch.Tensor
    num_classes: int


class TensorImages(Dataset):
    """In-memory uint8 images; `__getitems__` hands the DataLoader a whole batch in one indexing op."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        assert images.dtype == torch.uint8 and images.ndim == 4, "images must be uint8 [N, 3, S, S]"
        self.images = images.contiguous()
        self.labels = labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        _maybe_crash_worker(indices)
        return self.images[torch.as_tensor(indices)]


class DecodedImages(Dataset):
    """Wraps a torchvision data set of PIL images: decode, resize to `size`, return uint8 `[3, S, S]`."""

    def __init__(self, base, size: int):
        from torchvision.transforms import v2

        self.base = base
        self.transform = v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> torch.Tensor:
        image, _ = self.base[index]
        return self.transform(image.convert("RGB"))

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        _maybe_crash_worker(indices)
        return torch.stack([self[i] for i in indices])


def _maybe_crash_worker(indices: list[int]) -> None:
    """Fault injection for tests: `TRAINER_INJECT_FAULT=dataloader@N` kills a worker on its N-th batch."""
    spec = os.environ.get("TRAINER_INJECT_FAULT", "")
    if not spec.startswith("dataloader@"):
        return
    info = torch.utils.data.get_worker_info()
    if info is None:
        return
    count = getattr(_maybe_crash_worker, "count", 0) + 1
    _maybe_crash_worker.count = count
    if count >= int(spec.split("@", 1)[1]):
        os._exit(1)


def collate_batch(batch):
    """`__getitems__` already returns the stacked batch."""
    return batch


def build_splits(cfg: DataConfig) -> Splits:
    """The train and validation splits for `cfg.dataset`."""
    builders = {
        "digits": _digits,
        "synthetic": _synthetic,
        "imagefolder": _imagefolder,
        "cifar10": _cifar10,
        "stl10": _stl10,
    }
    splits = builders[cfg.dataset](cfg)
    if cfg.max_images is not None and len(splits.train) > cfg.max_images:
        keep = list(range(cfg.max_images))
        if isinstance(splits.train, TensorImages):
            splits.train = TensorImages(splits.train.images[: cfg.max_images], splits.train.labels[: cfg.max_images])
        else:  # keep the batched fetch that the DataLoader and the kNN feature pass rely on
            splits.train = _SubsetBatched(torch.utils.data.Subset(splits.train, keep))
        splits.train_labels = splits.train_labels[: cfg.max_images]
    return splits


def _split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


# ---- digits on cluttered canvases -------------------------------------------------------------


def digits_canvases(digits: np.ndarray, cfg: DataConfig, seed: int) -> np.ndarray:
    """Draw each 8x8 digit (values 0..16) on its own noisy, coloured `S x S` canvas; returns uint8 `[N, 3, S, S]`.

    Per canvas: a mid-grey background with a small tint and a vertical gradient, `cfg.clutter`
    distractor strokes (short lines that are lighter or darker than the background, as the digit is, so
    edges and contrast alone do not give the digit away), the digit upscaled to a random side in
    `cfg.digit_scale` of the canvas at a random position, lighter or darker than the background, then
    Gaussian pixel noise.
    """
    rng = np.random.default_rng(seed)
    n, size = len(digits), cfg.image_size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = np.empty((n, 3, size, size), dtype=np.uint8)
    digit_t = torch.from_numpy(digits.astype(np.float32) / 16.0)[:, None]  # [N,1,8,8]
    for i in range(n):
        # Muted colours around mid-grey: a grey level with a small tint. Fully random colours (or a wide
        # range of grey levels) let two views of one canvas be matched by their colour or brightness
        # alone; self-distillation then learns that shortcut (features that predict brightness, kNN at
        # chance) instead of the digit.
        level = rng.uniform(0.35, 0.65)
        bg = (level + rng.uniform(-0.1, 0.1, size=3)).astype(np.float32)
        grad = rng.uniform(-0.15, 0.15, size=3).astype(np.float32)
        canvas = bg[:, None, None] + grad[:, None, None] * (yy[None] / size - 0.5)
        for _ in range(cfg.clutter):
            # strokes contrast like the digit does (lighter or darker), so contrast alone does not find it
            colour = (level + _contrast(rng) + rng.uniform(-0.1, 0.1, size=3)).astype(np.float32)
            x0, y0 = rng.uniform(0, size, size=2)
            angle = rng.uniform(0, math.pi)
            length = rng.uniform(0.2, 0.5) * size
            x1, y1 = x0 + length * math.cos(angle), y0 + length * math.sin(angle)
            mask = _segment_mask(xx, yy, x0, y0, x1, y1, width=rng.uniform(0.7, 1.5))
            canvas = canvas * (1 - mask) + colour[:, None, None] * mask
        side = int(round(rng.uniform(*cfg.digit_scale) * size))
        side = max(6, min(size, side))
        glyph = torch.nn.functional.interpolate(digit_t[i : i + 1], size=(side, side), mode="bilinear", align_corners=False)
        glyph = glyph[0, 0].clamp(0, 1).numpy()
        top, left = rng.integers(0, size - side + 1, size=2)
        fg = np.clip(level + _contrast(rng) + rng.uniform(-0.1, 0.1, size=3), 0.0, 1.0)  # lighter or darker
        region = canvas[:, top : top + side, left : left + side]
        canvas[:, top : top + side, left : left + side] = region * (1 - glyph) + fg[:, None, None].astype(np.float32) * glyph
        canvas = canvas + rng.normal(0.0, cfg.noise_std, size=canvas.shape).astype(np.float32)
        out[i] = (np.clip(canvas, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return out


def _contrast(rng) -> float:
    """A brightness offset from the background: 0.3 to 0.45, lighter or darker with equal odds."""
    return float(rng.uniform(0.3, 0.45) * rng.choice((-1.0, 1.0)))


def _segment_mask(xx, yy, x0, y0, x1, y1, width):
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / (dx * dx + dy * dy + 1e-9), 0.0, 1.0)
    dist = np.hypot(xx - (x0 + t * dx), yy - (y0 + t * dy))
    return np.clip(width - dist + 0.5, 0.0, 1.0)[None]


def _digits(cfg: DataConfig) -> Splits:
    from sklearn.datasets import load_digits

    raw = load_digits()
    train_idx, val_idx = _split_indices(len(raw.target), cfg.val_fraction, cfg.split_seed)
    train_src = np.repeat(raw.images[train_idx], cfg.canvases_per_digit, axis=0)
    train_y = np.repeat(raw.target[train_idx], cfg.canvases_per_digit)
    train = digits_canvases(train_src, cfg, seed=cfg.split_seed * 1000 + 1)
    val = digits_canvases(raw.images[val_idx], cfg, seed=cfg.split_seed * 1000 + 2)
    ty, vy = torch.as_tensor(train_y, dtype=torch.long), torch.as_tensor(raw.target[val_idx], dtype=torch.long)
    return Splits(TensorImages(torch.from_numpy(train), ty), ty, TensorImages(torch.from_numpy(val), vy), vy, 10)


# ---- synthetic (tests, benchmarks) -------------------------------------------------------------


def _synthetic(cfg: DataConfig) -> Splits:
    """Random images whose class sets a coloured blob, so kNN has something to find; no files needed."""
    g = torch.Generator().manual_seed(cfg.split_seed)
    n, s, k = cfg.synthetic_size, cfg.image_size, cfg.synthetic_classes
    labels = torch.arange(n) % k
    images = torch.randint(0, 256, (n, 3, s, s), generator=g, dtype=torch.uint8)
    palette = torch.randint(0, 256, (k, 3), generator=g, dtype=torch.uint8)
    half = s // 2
    images[:, :, :half, :half] = palette[labels][:, :, None, None]
    train_idx, val_idx = _split_indices(n, cfg.val_fraction, cfg.split_seed)
    ti, vi = torch.as_tensor(train_idx), torch.as_tensor(val_idx)
    return Splits(TensorImages(images[ti], labels[ti]), labels[ti], TensorImages(images[vi], labels[vi]), labels[vi], k)


# ---- folders and torchvision sets ------------------------------------------------------------


def _labelled_split(full, targets, cfg: DataConfig, num_classes: int) -> Splits:
    train_idx, val_idx = _split_indices(len(targets), cfg.val_fraction, cfg.split_seed)
    targets = torch.as_tensor(targets, dtype=torch.long)
    sub = torch.utils.data.Subset
    return Splits(
        _SubsetBatched(sub(full, train_idx.tolist())), targets[train_idx],
        _SubsetBatched(sub(full, val_idx.tolist())), targets[val_idx], num_classes,
    )


class _SubsetBatched(Dataset):
    """A Subset of a `DecodedImages` that keeps the batched fetch."""

    def __init__(self, subset):
        self.subset = subset

    def __len__(self) -> int:
        return len(self.subset)

    def __getitem__(self, index):
        return self.subset[index]

    def __getitems__(self, indices):
        return self.subset.dataset.__getitems__([self.subset.indices[i] for i in indices])


def _imagefolder(cfg: DataConfig) -> Splits:
    from torchvision.datasets import ImageFolder

    if not cfg.root.is_dir():
        raise ConfigError(f"data.root: {cfg.root} is not a folder (imagefolder needs one sub-folder per class)")
    base = ImageFolder(str(cfg.root))
    return _labelled_split(DecodedImages(base, cfg.image_size), base.targets, cfg, len(base.classes))


def _torchvision_set(cls, cfg: DataConfig, **kwargs):
    """A torchvision data set from `data.root`; missing files are a user error unless download is allowed."""
    try:
        return cls(str(cfg.root), download=cfg.download, **kwargs)
    except RuntimeError as exc:
        if "download" not in str(exc).lower() and "not found" not in str(exc).lower():
            raise
        raise ConfigError(
            f"data.root: no {cfg.dataset} files in {cfg.root}; set data.download: true to download them") from None


def _cifar10(cfg: DataConfig) -> Splits:
    from torchvision.datasets import CIFAR10

    base = _torchvision_set(CIFAR10, cfg, train=True)
    return _labelled_split(DecodedImages(base, cfg.image_size), base.targets, cfg, 10)


def _stl10(cfg: DataConfig) -> Splits:
    from torchvision.datasets import STL10

    base = _torchvision_set(STL10, cfg, split="train")
    return _labelled_split(DecodedImages(base, cfg.image_size), base.labels.tolist(), cfg, 10)


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of indices for one epoch: a permutation from (seed, epoch), sharded by rank, from `start` on.

    Deterministic from its arguments, so a resumed run sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start: int = 0, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.start, self.rank, self.world = start, rank, world

    def batches_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world)

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        per_rank = self.batches_per_epoch() * self.batch_size
        mine = perm[self.rank * per_rank : (self.rank + 1) * per_rank]
        for b in range(self.start, self.batches_per_epoch()):
            yield mine[b * self.batch_size : (b + 1) * self.batch_size].tolist()
