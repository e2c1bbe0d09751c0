"""The GPU knobs' plumbing, checked on any machine: torch.compile on the backbone only (a stand-in compiler:
a real compile of even the tiny model takes minutes on 2 cores), fp16's grad scaler (a skipped step is by
design, a run of them a failure), kNN features in fp32 whatever the precision, and cuDNN's benchmark mode."""

from __future__ import annotations

import pytest
import torch
from trainer_tiny import one_thread, tiny_config  # noqa: F401 (a fixture)

from trainer import engine, knn
from trainer.parity import ParityError, check


def test_compile_wraps_only_the_backbone_and_keeps_state_dict_keys(monkeypatch, one_thread):
    compiled: list[tuple] = []

    def stand_in(module, mode=None, dynamic=None, **kwargs):
        compiled.append((type(module).__name__, mode, dynamic))
        return lambda x: module(x) * 1.0  # the same math, through the "compiled" callable

    monkeypatch.setattr(torch, "compile", stand_in)
    plain = engine.train(tiny_config(budget__steps=3, eval__at_start=False))
    result = engine.train(tiny_config(budget__steps=3, eval__at_start=False, system__compile="max-autotune",
                                      system__compile_dynamic=False))
    assert result.status == "ok"
    assert compiled == [("ResNetBackbone", "max-autotune", False)] * 2  # student and teacher backbones, nothing else
    assert result.losses == plain.losses  # the stand-in computes what the eager backbone does
    runs = [engine.Run(tiny_config(system__compile=mode), None, None) for mode in ("default", "off")]
    for run in runs:
        run.build()
    compiled_keys, eager_keys = (set(run.student.state_dict()) for run in runs)
    assert compiled_keys == eager_keys  # checkpoints, exports and warm starts see the same module tree


def test_every_compiled_run_starts_from_empty_compile_caches(monkeypatch, one_thread):
    # several runs in one process (tuner confirm, explain, a reused Ray actor): code compiled by an earlier
    # run would count against dynamo's recompile limit, past which the backbone runs eagerly unannounced
    import torch._dynamo as dynamo

    resets: list[int] = []
    monkeypatch.setattr(dynamo, "reset", lambda: resets.append(1))
    monkeypatch.setattr(torch, "compile", lambda module, mode=None, dynamic=None, **kw: module)
    for _ in range(2):
        assert engine.train(tiny_config(budget__steps=1, eval__at_start=False, system__compile="default")).status == "ok"
    assert engine.train(tiny_config(budget__steps=1, eval__at_start=False)).status == "ok"
    assert len(resets) == 2  # once per compiled run, never for an eager one


def test_a_run_of_grad_scaler_skips_is_a_failure_but_single_skips_are_not(monkeypatch, one_thread):
    ok = engine.train(tiny_config(budget__steps=4, eval__at_start=False, system__precision="fp16"))
    assert ok.status == "ok"  # fp16 starts at scale 2**16: its first steps are skipped, by design
    monkeypatch.setattr(engine, "SCALER_SKIPS_FAIL", 2)
    failed = engine.train(tiny_config(budget__steps=4, eval__at_start=False, system__precision="fp16"))
    assert failed.status == "failed" and failed.failure["reason"] == "nan"
    assert failed.failure["message"].startswith("the grad scaler skipped 2 steps in a row")


def test_knn_features_are_computed_in_fp32_whatever_the_training_precision(monkeypatch, one_thread):
    seen: list[bool] = []
    extract = knn.extract_features

    def recording(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return extract(*args, **kwargs)

    monkeypatch.setattr(engine, "extract_features", recording)
    # fp16, not bf16: on AVX2 CPUs bf16 convolutions now and then return non-finite weight gradients
    # (docs/results.md), which would fail the run for a reason this test is not about
    result = engine.train(tiny_config(budget__steps=2, system__precision="fp16"))
    assert result.status == "ok" and seen and not any(seen)


def test_cudnn_benchmark_cannot_be_parity_checked_on_cuda_and_changes_nothing_on_a_cpu(one_thread):
    a = tiny_config(budget__steps=30)
    result = check(a, a.with_overrides({"system.cudnn_benchmark": True}), steps=2)
    assert result.ok and result.max_diff == 0.0 and result.knobs["system.cudnn_benchmark"][2] == "exact"
    if not torch.cuda.is_available():
        pytest.skip("the refusal needs a CUDA device: cuDNN's benchmark mode exists only there")
    cuda = a.with_overrides({"system.device": "cuda"})
    with pytest.raises(ParityError, match="cudnn_benchmark picks kernels by timing"):
        check(cuda, cuda.with_overrides({"system.cudnn_benchmark": True}), steps=2)
