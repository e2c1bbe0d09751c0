"""Shared fixtures: one local Ray for the whole test session (temporary folders, never the home folder),
and tiny search spaces for the tuner tests (synthetic data, a width-8 ResNet-18, a few steps)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

TINY_BASE = {
    "data.dataset": "synthetic", "data.synthetic_size": 64, "data.image_size": 16,
    "crops.global_size": 16, "crops.local_size": 8, "model.width": 8,
    "model.head.out_dim": 64, "model.head.hidden_dim": 64, "model.head.bottleneck_dim": 32,
    "optim.batch_size": 16, "budget.steps": 4, "measure.warmup_steps": 1, "measure.window_steps": 1,
    "measure.windows": 2, "eval.every_steps": 0,
}
TINY_TRIAL = {"warmup_steps": 1, "window_steps": 2, "windows": 2, "steps": 8, "eval_every_steps": 4, "timeout_s": 120}


def write_tiny_space(folder: Path, space_name: str, **sections) -> Path:
    """Write a space with the tiny base and trial budget; `sections` replace top-level keys (`trial` is merged)."""
    trial = {**TINY_TRIAL, **sections.pop("trial", {})}
    data = {
        "name": space_name,
        "base": {"overrides": dict(TINY_BASE)},
        "baseline": {"crops.local_crops": 2, "model.head.out_dim": 64},
        "params": {"crops.local_crops": {"choices": [0, 2]}},
        "trial": trial,
        "budget": {"n_trials": 3},
        "sampler": {"name": "random", "seed": 0},
        "ray": {"torch_threads": 1},  # the test machine is shared; 2 spinning OpenMP threads crawl
        **sections,
    }
    path = Path(folder) / f"{space_name}.yaml"
    path.write_text("# test space\n" + yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_space():
    """The `write_tiny_space(folder, name, **sections)` helper."""
    return write_tiny_space


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 2 CPUs, no dashboard, its files in a temporary folder; shut down at the end."""
    import ray

    tmp = tempfile.mkdtemp(prefix="ray-tests-", dir="/tmp")  # short: Ray's socket paths have a length limit
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=tmp)
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
