"""Shared pieces of the trainer tests: a tiny config that trains in about a second, and one CPU thread.

Not a test module (no `test_` prefix); the trainer test files import it by name (pytest puts `tests/`
on `sys.path` because the folder has no `__init__.py`).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from trainer import TrainConfig

#: 64 synthetic images (51 train, 13 validation), batch 16: 3 optimizer steps per epoch; a ResNet-18 at
#: width 16 (a sixteenth of the parameters) keeps each step in milliseconds.
TINY = {
    "data.dataset": "synthetic", "data.synthetic_size": 64, "model.width": 16,
    "model.head.out_dim": 64, "model.head.hidden_dim": 64, "model.head.bottleneck_dim": 32,
    "optim.batch_size": 16, "budget.steps": 6, "system.device": "cpu",
    "measure.warmup_steps": 1, "measure.window_steps": 2, "measure.windows": 2, "measure.profile_steps": 1,
}
TINY_STEPS_PER_EPOCH = 3


def tiny_config(**overrides: Any) -> TrainConfig:
    """The tiny config with dotted-path overrides given as keyword arguments with `__` for dots."""
    return TrainConfig().with_overrides({**TINY, **{k.replace("__", "."): v for k, v in overrides.items()}})


def single_thread_env() -> dict[str, str]:
    """Environment for subprocesses: one intra-op thread each, so two ranks do not fight over two cores."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture
def one_thread():
    """Run torch on one thread for the test. On a small shared machine, torch's default of one thread
    per core oversubscribes as soon as another process computes, and small steps get ~20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
