"""Data sources other than the embedded default: an image folder on disk, and datasets that must not download."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer import TrainConfig, train
from trainer.config import ConfigError
from trainer.data import build_splits


def _write_folder(root: Path, classes: int = 3, per_class: int = 12) -> None:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
            pixels[:20, :20] = [80 * c, 255 - 80 * c, 40]  # a class-coloured corner
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")


def test_imagefolder_decodes_resizes_and_splits(tmp_path):
    _write_folder(tmp_path / "imgs")
    cfg = TrainConfig().with_overrides({"data.dataset": "imagefolder", "data.root": str(tmp_path / "imgs"),
                                        "data.image_size": 24, "data.val_fraction": 0.25})
    splits = build_splits(cfg.data)
    assert len(splits.train) + len(splits.val) == 36
    assert len(splits.val) == 9
    batch = splits.train.__getitems__([0, 1, 2])
    assert batch.dtype == torch.uint8 and tuple(batch.shape) == (3, 3, 24, 24)
    assert set(splits.train_labels.tolist()) <= {0, 1, 2} and splits.num_classes == 3


def test_max_images_keeps_batched_fetch_for_decoded_sets(tmp_path):
    _write_folder(tmp_path / "imgs")
    cfg = TrainConfig().with_overrides({"data.dataset": "imagefolder", "data.root": str(tmp_path / "imgs"),
                                        "data.image_size": 24, "data.max_images": 16})
    splits = build_splits(cfg.data)
    assert len(splits.train) == 16 and splits.train_labels.shape == (16,)
    batch = splits.train.__getitems__([0, 5, 15])
    assert isinstance(batch, torch.Tensor) and tuple(batch.shape) == (3, 3, 24, 24)


def test_imagefolder_trains_with_workers(tmp_path):
    _write_folder(tmp_path / "imgs")
    cfg = TrainConfig().with_overrides({
        "data.dataset": "imagefolder", "data.root": str(tmp_path / "imgs"), "data.image_size": 32,
        "model.head.out_dim": 64, "model.head.hidden_dim": 64, "model.head.bottleneck_dim": 32,
        "optim.batch_size": 8, "budget.steps": 4, "system.num_workers": 2, "system.prefetch_factor": 2,
        "measure.warmup_steps": 1, "measure.window_steps": 1, "measure.windows": 2,
    })
    result = train(cfg)
    assert result.status == "ok", result.failure
    assert result.summary["steps"] == 4
    assert 0.0 <= result.summary["knn_top1"] <= 100.0


def test_datasets_needing_a_root_say_so():
    with pytest.raises(ConfigError, match=r"data: .*dataset 'cifar10' needs data.root"):
        TrainConfig.from_dict({"data": {"dataset": "cifar10"}}, source="space.yaml")


@pytest.mark.parametrize("dataset", ["cifar10", "stl10"])
def test_missing_torchvision_set_is_a_config_error_not_a_download(tmp_path, dataset):
    cfg = TrainConfig().with_overrides({"data.dataset": dataset, "data.root": str(tmp_path), "budget.steps": 1})
    with pytest.raises(ConfigError, match=rf"data.root: no {dataset} files in .*set data.download: true"):
        train(cfg)
    assert list(tmp_path.iterdir()) == []  # nothing fetched


def test_missing_image_folder_is_a_config_error(tmp_path):
    cfg = TrainConfig().with_overrides({"data.dataset": "imagefolder", "data.root": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="is not a folder"):
        train(cfg)
