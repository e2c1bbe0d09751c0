"""Parity: a knob that must not change the training math is checked by running both configs a few steps.

The planted bug (TRAINER_INJECT_FAULT=mathbug:PATH scales one layer's gradient by 1.01 in runs where PATH
is set) must fail; DataLoader workers, channels_last, gradient checkpointing and (on a ViT) crop
concatenation must pass. Every check runs the tiny config on one thread for 3 steps.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from trainer_tiny import single_thread_env, tiny_config

from trainer.config import ConfigError, TrainConfig
from trainer.knobs import CONDITIONAL, KNOB_CLASSES, NOT_KNOBS, flatten, knob_class
from trainer.parity import QUANTITIES, ParityError, check, deterministic, trajectory

STEPS = 3
A = tiny_config(budget__steps=30)  # a longer budget so the lr warm-up lets the 3 steps move the weights
VIT = tiny_config(budget__steps=30, model__backbone="vit_tiny", model__patch_size=4, model__vit_depth=2,
                  data__image_size=16, crops__global_size=16, crops__local_size=8)


@pytest.fixture(scope="module")
def base():
    """A's trajectory, initial state and round-off reference, shared by the checks of this module."""
    torch.set_num_threads(1)
    run = trajectory(A, STEPS)
    reference = check(A, A, steps=STEPS, base=run).reference
    return {"base": run, "reference": reference}


def checked(base, overrides):
    return check(A, A.with_overrides(overrides), steps=STEPS, base=base["base"], reference=base["reference"])


def test_every_config_field_is_declared_once_as_a_knob_class_or_as_not_a_knob():
    fields = set(flatten(TrainConfig().to_dict()))
    declared = [set(KNOB_CLASSES), set(CONDITIONAL), set(NOT_KNOBS)]
    assert set().union(*declared) == fields
    assert sum(len(d) for d in declared) == len(fields)  # no field in two tables
    assert knob_class("system.channels_last") == "exact" and knob_class("system.precision") == "approximate"
    assert knob_class("crops.local_crops") == "method"
    with pytest.raises(ConfigError, match="system.seed is not a knob"):
        knob_class("system.seed")
    with pytest.raises(ConfigError, match="has no knob class"):
        knob_class("model.head.some_new_field")


def test_a_config_against_itself_is_bit_identical(base):
    again, _ = trajectory(A, STEPS)
    first, _ = base["base"]
    assert again.losses == first.losses and torch.equal(again.param_grad_norms, first.param_grad_norms)
    assert all(torch.equal(again.weights[n], w) for n, w in first.weights.items())


def test_dataloader_workers_keep_the_math_bit_for_bit(base):
    result = checked(base, {"system.num_workers": 2, "system.persistent_workers": True})
    assert result.ok and result.max_diff == 0.0
    assert result.knobs == {"system.num_workers": [0, 2, "exact"], "system.persistent_workers": [False, True, "exact"]}


def test_channels_last_passes_within_the_measured_round_off(base):
    result = checked(base, {"system.channels_last": True})
    assert result.ok, result.line()
    assert 0.0 < result.max_diff  # a different kernel: round-off, not zero...
    assert all(w["ratio"] <= 1.0 for w in result.worst.values())  # ...within 100x the batch-order reference
    assert result.line().startswith("parity ok (max rel. diff")


def test_gradient_checkpointing_is_bit_identical_including_batchnorm_statistics(base):
    # It used to update every BatchNorm's running statistics twice (once more in the recompute).
    result = checked(base, {"system.grad_checkpointing": True})
    assert result.ok and result.max_diff == 0.0
    assert result.worst["buffers"]["diff"] == 0.0


def test_checkpointed_backbone_counts_each_batch_once_in_batchnorm():
    from trainer.model import ResNetBackbone

    torch.manual_seed(0)
    net = ResNetBackbone(A.model)
    net.grad_checkpointing = True
    net(torch.randn(4, 3, 16, 16)).sum().backward()
    counts = {int(m.num_batches_tracked) for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert counts == {1}


def test_a_planted_gradient_bug_behind_an_exact_knob_fails_parity(base, monkeypatch):
    monkeypatch.setenv("TRAINER_INJECT_FAULT", "mathbug:system.channels_last")
    result = checked(base, {"system.channels_last": True})
    assert result.verdict == "failed"
    assert "param_grad_norms" in result.failed
    worst = result.worst["param_grad_norms"]
    assert worst["diff"] == pytest.approx(0.01, rel=1e-3)  # the 1.01 scale, found on the layer it hit
    assert worst["where"].endswith("backbone.net.conv1.weight")
    assert worst["ratio"] > 10
    assert result.line().startswith("parity FAILED: param_grad_norms 1.0e-02 >")


def test_crop_concatenation_is_exact_on_a_vit_and_a_method_knob_with_batchnorm():
    torch.set_num_threads(1)
    result = check(VIT, VIT.with_overrides({"crops.concat_same_resolution": False}), steps=STEPS)
    assert result.ok, result.line()
    assert result.knobs["crops.concat_same_resolution"][2] == "exact"
    with pytest.raises(ParityError, match="concat_same_resolution is a method knob here .*BatchNorm"):
        check(A, A.with_overrides({"crops.concat_same_resolution": False}), steps=STEPS)


def test_method_knobs_and_other_seeds_are_refused_with_one_line():
    with pytest.raises(ParityError) as err:
        check(A, A.with_overrides({"model.head.out_dim": 32}), steps=STEPS)
    assert "model.head.out_dim is a method knob here (64 -> 32)" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ParityError, match="system.seed differs"):
        check(A, A.with_overrides({"system.seed": 1}), steps=STEPS)
    with pytest.raises(ParityError, match="steps must be at least 1"):
        check(A, A, steps=0)


def test_reduced_precision_is_judged_against_its_band_measured_at_other_seeds(base):
    bands: dict = {}
    lines: list[str] = []
    result = check(A, A.with_overrides({"system.precision": "fp16"}), steps=2, seeds=2, bands=bands, progress=lines.append)
    assert list(bands) == ["system.precision=fp16"]
    band = bands["system.precision=fp16"]
    assert set(band) == set(QUANTITIES) and len(band["loss"]) == 2
    assert max(band["loss"]) > 1e-6  # fp16's rounding is in the band, far above fp32's round-off
    assert result.ok, result.line()
    assert "2 x its band over 2 seed(s)" in result.tolerance_source
    assert sum("band of system.precision=fp16 at seed" in line for line in lines) == 2
    # fp16 starts with a loss scale of 2**16: the scaler skips the first steps, and they are not compared
    assert "skipped by the grad scaler" in result.worst["grad_norm"]["where"]


def test_an_op_without_a_deterministic_implementation_is_named():
    with pytest.raises(ParityError, match="cannot be made deterministic on cpu: scatter_add_cuda_kernel does not"):
        with deterministic(torch.device("cpu")):
            raise RuntimeError("scatter_add_cuda_kernel does not have a deterministic implementation, but you set ...")
    assert not torch.are_deterministic_algorithms_enabled()  # restored


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "trainer", "parity", *args], capture_output=True, text=True,
                          env=env or single_thread_env(), timeout=300)


def test_trainer_parity_command_exit_codes_and_table(tmp_path):
    a = A.save(tmp_path / "a.yaml")
    b = A.with_overrides({"system.channels_last": True}).save(tmp_path / "b.yaml")
    m = A.with_overrides({"crops.local_crops": 0}).save(tmp_path / "m.yaml")
    ok = _cli(str(a), str(b), "--steps", "2")
    assert ok.returncode == 0, ok.stderr
    assert "system.channels_last  False  True  exact" in ok.stdout and "parity ok" in ok.stdout
    bug = _cli(str(a), str(b), "--steps", "2", "--json", env={**single_thread_env(), "TRAINER_INJECT_FAULT": "mathbug:system.channels_last"})
    assert bug.returncode == 1
    data = json.loads(bug.stdout)
    assert data["verdict"] == "failed" and "param_grad_norms" in data["failed"]
    assert math.isclose(data["worst"]["param_grad_norms"]["diff"], 0.01, rel_tol=1e-3)
    refused = _cli(str(a), str(m))
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith(f"error: {a} vs {m}: crops.local_crops is a method knob")
