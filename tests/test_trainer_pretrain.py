"""The built-in warm start (`model.init: supervised[:STEPS]`): trained with labels on the run's training
split, cached by what decides it, loaded into student and teacher, and refused in one line when misspelt."""

from __future__ import annotations

import pytest
import torch

from trainer import ConfigError
from trainer.engine import Run
from trainer.pretrain import cache_dir, parse_steps, warm_backbone_file

from trainer_tiny import one_thread, tiny_config  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_supervised_warm_start_is_built_once_cached_and_loaded_into_student_and_teacher(cache):
    lines: list[str] = []
    cfg = tiny_config(model__init="supervised:12")
    path = warm_backbone_file(cfg, lines.append)
    assert path.parent == cache == cache_dir() and path.is_file()
    assert lines[0].startswith("warm start: 12 steps of supervised training") and "step 12/12" in lines[-2]
    assert lines[-1].startswith(f"warm start: cached {path}")
    built_at = path.stat().st_mtime_ns
    # the same key: the file is read, nothing is trained or printed again
    again: list[str] = []
    assert warm_backbone_file(cfg, again.append) == path and again == [] and path.stat().st_mtime_ns == built_at

    saved = torch.load(path, weights_only=True)
    run = Run(cfg, None, None)
    run.build()
    assert run.init_loaded.startswith("supervised:12: the cached warm backbone")
    for backbone in (run.student.backbone, run.teacher.backbone):
        state = backbone.state_dict()
        assert set(state) == set(saved) and all(torch.equal(state[k], saved[k]) for k in saved)
    # trained: not the random initialization a cold run of the same seed starts from
    cold = Run(tiny_config(), None, None)
    cold.build()
    cold_state = cold.student.backbone.state_dict()
    assert not torch.equal(cold_state["net.conv1.weight"], saved["net.conv1.weight"])


def test_the_cache_key_follows_steps_and_data_but_not_the_head(cache):
    quiet = lambda line: None  # noqa: E731
    a = warm_backbone_file(tiny_config(model__init="supervised:3"), quiet)
    assert warm_backbone_file(tiny_config(model__init="supervised:3", model__head__out_dim=32), quiet) == a
    assert warm_backbone_file(tiny_config(model__init="supervised:4"), quiet) != a
    assert warm_backbone_file(tiny_config(model__init="supervised:3", data__synthetic_size=80), quiet) != a
    assert len(list(cache.glob("*.pt"))) == 3


@pytest.mark.parametrize("spec", ["supervised:", "supervised:abc", "supervised:0"])
def test_a_misspelt_builtin_warm_start_is_one_line_naming_the_field(cache, spec):
    with pytest.raises(ConfigError) as err:  # refused when the config is read, before anything is built
        Run(tiny_config(model__init=spec), None, None).build()
    text = str(err.value)
    assert "\n" not in text and "model.init: the built-in warm start is 'supervised' or 'supervised:STEPS'" in text
    assert text.endswith(f"(got {spec!r})")
    assert not cache.exists()


def test_default_steps():
    assert parse_steps("supervised") == 300 and parse_steps("supervised:40") == 40


def test_the_cached_backbone_carries_batchnorm_statistics_of_the_plain_training_images(cache):
    """The running statistics a training run leaves lag its weights; the cached ones are recomputed on the
    evaluation view of the training images, so a warm run's kNN before training reads the weights."""
    from trainer.augment import MultiCrop
    from trainer.data import build_splits
    from trainer.model import build_backbone

    cfg = tiny_config(model__init="supervised:5")
    saved = torch.load(warm_backbone_file(cfg, lambda line: None), weights_only=True)
    backbone, _ = build_backbone(cfg.model, cfg.crops.global_size)
    backbone.load_state_dict(saved)
    splits = build_splits(cfg.data)
    view = MultiCrop(cfg.crops, cfg.augment, torch.device("cpu")).plain(splits.train.images, cfg.crops.global_size)
    with torch.no_grad():
        first = backbone.net.conv1(view)  # what the first BatchNorm sees: all 51 training images, one batch
    bn = backbone.net.bn1
    assert torch.allclose(bn.running_mean, first.mean(dim=(0, 2, 3)), atol=1e-4)
    assert torch.allclose(bn.running_var, first.var(dim=(0, 2, 3)), rtol=1e-3, atol=1e-5)
