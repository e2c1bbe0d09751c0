"""The GPU knobs on a real CUDA device: fp16 with its grad scaler (state in the checkpoint), bf16, TF32,
channels_last, pinned memory with DataLoader workers, and torch.compile with CUDA graphs; plus the timed
windows, which on a GPU synchronize only at their ends. Each test skips on a machine without CUDA (this
project's CI has none); they run where a GPU is, e.g. `python -m pytest tests/test_trainer_cuda.py`."""

from __future__ import annotations

import pytest
import torch
from trainer_tiny import tiny_config

from trainer import engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")


def cuda_config(**overrides):
    return tiny_config(system__device="cuda", eval__at_start=False, **overrides)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_every_precision_trains_on_cuda_with_the_data_path_knobs(tmp_path, precision):
    cfg = cuda_config(budget__steps=6, system__precision=precision, system__tf32=True, system__channels_last=True,
                      system__pin_memory=True, system__num_workers=2, system__persistent_workers=True,
                      system__prefetch_factor=2, system__cudnn_benchmark=True)
    result = engine.train(cfg, out_dir=tmp_path)
    assert result.status == "ok", result.failure
    assert len(result.losses) == 6 and all(torch.isfinite(torch.tensor(result.losses)))
    assert result.speed.throughput_img_s > 0 and result.speed.memory_kind == "cuda_max_allocated"
    state = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=False)
    if precision == "fp16":  # the grad scaler's state travels with the checkpoint, so a resume keeps its scale
        assert state["scaler"] is not None and state["scaler"]["scale"] > 0
    else:
        assert state["scaler"] is None


def test_fp16_resume_continues_the_grad_scalers_state(tmp_path):
    whole = engine.train(cuda_config(budget__steps=6, system__precision="fp16"), out_dir=tmp_path / "whole")
    first = engine.train(cuda_config(budget__steps=6, budget__stop_at_step=3, system__precision="fp16"),
                         out_dir=tmp_path / "parts")
    resumed = engine.train(cuda_config(budget__steps=6, system__precision="fp16"), out_dir=tmp_path / "parts", resume=True)
    assert whole.status == first.status == resumed.status == "ok"
    scalers = [torch.load(tmp_path / d / "checkpoint.pt", map_location="cpu", weights_only=False)["scaler"]
               for d in ("whole", "parts")]
    # the scale and its growth tracker come back from the checkpoint: a resumed run ends where an
    # uninterrupted one does (a scaler restarted at 2**16 would differ after the first steps' overflows)
    assert scalers[0]["scale"] == scalers[1]["scale"] and scalers[0]["_growth_tracker"] == scalers[1]["_growth_tracker"]
    assert resumed.losses == pytest.approx(whole.losses, rel=1e-3)  # the resumed run reports all 6 steps


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_backbone_trains_on_cuda_and_its_compile_time_is_kept_apart(mode):
    eager = engine.train(cuda_config(budget__steps=6))
    compiled = engine.train(cuda_config(budget__steps=6, system__compile=mode))
    assert compiled.status == "ok", compiled.failure
    assert compiled.speed.compile_s > 0 and eager.speed.compile_s == 0
    # the compiled backbone computes what the eager one does, up to float round-off
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-3)


def test_timed_windows_on_cuda_synchronize_only_at_their_ends(monkeypatch):
    calls: list[str] = []
    real = torch.cuda.synchronize

    def counting(*args, **kwargs):
        calls.append("sync")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, "synchronize", counting)
    cfg = cuda_config(budget__steps=8, measure__warmup_steps=1, measure__window_steps=3, measure__windows=2,
                      measure__profile_steps=0)
    result = engine.train(cfg, speed_only=True)
    assert result.status == "ok"
    # 2 windows of 3 steps: a clock read at the start and end of each window, never one per step or phase
    assert len(calls) <= 2 * 2 + 2
