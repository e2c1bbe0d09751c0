"""The speed phase's protocol: timed windows synchronize the device only at their two ends, the phase
breakdown comes from separate profiled steps, and summary.json says which steps each figure came from.

On a CPU machine, `trainer.measure.synchronize` is replaced by a counting stand-in (as are
`torch.cuda.synchronize` and `torch.cuda.Event`, which nothing in a window may touch) and every training
step leaves a marker, so the test reads the exact order of steps and synchronizations.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from trainer_tiny import one_thread, tiny_config  # noqa: F401 (a fixture)

from trainer import engine, measure
from trainer.events import PHASES


def test_timed_windows_synchronize_only_at_their_ends_and_phases_come_from_profiled_steps(monkeypatch, tmp_path, one_thread):
    trace: list[str] = []
    monkeypatch.setattr(measure, "synchronize", lambda device: trace.append("sync"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: trace.append("cuda.synchronize"))
    monkeypatch.setattr(torch.cuda, "Event", lambda *a, **k: trace.append("cuda.Event"))
    step = engine.Run.train_step
    monkeypatch.setattr(engine.Run, "train_step", lambda self, batches: (trace.append("step"), step(self, batches))[1])

    def on_event(event, payload):
        if event in ("window", "speed"):
            trace.append(event)

    config = tiny_config(budget__steps=12, measure__warmup_steps=2, measure__window_steps=3, measure__windows=2,
                         measure__profile_steps=2, eval__at_start=False)
    result = engine.train(config, callback=on_event, out_dir=tmp_path)
    assert result.status == "ok"
    marks = [m for m in trace if m != "log"]
    window = ["sync", "step", "step", "step", "sync", "window"]
    profiled = ["step"] + ["sync"] * (1 + len(PHASES))  # in the step: the timer's start, then one per phase
    assert marks[:2] == ["step", "step"]  # warm-up: no clock at all
    assert marks[2:14] == window + window
    assert marks[14:14 + 2 * len(profiled)] == profiled + profiled
    assert marks[14 + 2 * len(profiled)] == "speed"
    assert marks[15 + 2 * len(profiled):] == ["step"] * 2  # after the speed phase: no synchronization
    assert "cuda.synchronize" not in trace and "cuda.Event" not in trace

    speed = result.speed
    assert speed.window_step_range == [2, 8] and speed.profiled_step_range == [8, 10] and speed.timed_steps == 6
    assert len(speed.throughput_windows) == 2 and all(tp > 0 for tp in speed.throughput_windows)
    assert set(speed.phases_ms) == set(PHASES) and all(ms > 0 for ms in speed.phases_ms.values())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["window_step_range"] == [2, 8] and summary["profiled_step_range"] == [8, 10]


def test_without_profiled_steps_there_is_no_phase_breakdown_and_no_synchronization_inside_steps(monkeypatch, one_thread):
    calls: list[str] = []
    monkeypatch.setattr(measure, "synchronize", lambda device: calls.append("sync"))
    config = tiny_config(budget__steps=6, measure__warmup_steps=1, measure__window_steps=2, measure__windows=2,
                         measure__profile_steps=0, eval__at_start=False)
    result = engine.train(config, speed_only=True)
    assert calls == ["sync"] * 4  # two windows, two ends each
    assert result.speed.profiled_step_range == [5, 5] and all(ms == 0.0 for ms in result.speed.phases_ms.values())
    assert result.summary["steps"] == 5  # speed_only stops when the speed phase is done


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs to reset the peak")
def test_peak_memory_is_each_runs_own_when_one_process_runs_several(one_thread):
    # a 65536-wide head holds hundreds of MB (weights, gradients, AdamW's state, the teacher's copy)
    big = engine.train(tiny_config(budget__steps=2, eval__at_start=False, model__head__out_dim=65536,
                                   model__head__hidden_dim=512, model__head__bottleneck_dim=256))
    small = engine.train(tiny_config(budget__steps=2, eval__at_start=False))
    assert big.status == small.status == "ok"
    assert big.summary["peak_memory_mb"] > small.summary["peak_memory_mb"] + 100


def test_the_cpu_is_named_with_its_vector_instructions():
    # a VM's model name ("AMD EPYC") may hide whether it has AVX2 only or AVX-512 with native bf16
    assert measure.vector_isa({"fpu", "sse2", "avx", "avx2", "fma"}) == "AVX2"
    assert measure.vector_isa({"avx2", "avx512f", "avx512bw"}) == "AVX-512"
    assert measure.vector_isa({"avx2", "avx512f", "avx512_bf16"}) == "AVX-512, BF16"
    assert measure.vector_isa({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}) == "AVX-512, AMX, BF16"
    assert measure.vector_isa({"fp", "asimd"}) == ""  # not x86: the name alone
    lines = open("/proc/cpuinfo").read().splitlines() if os.path.exists("/proc/cpuinfo") else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    flags = [set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")]
    if names and flags:  # this machine, as the study's hardware fingerprint will name it
        isa = measure.vector_isa(flags[0])
        assert measure.cpu_model() == (f"{names[0]} ({isa})" if isa else names[0])


def _epoch_config(workers: int, **overrides):
    """256 synthetic images: more than 8 steps an epoch, so the epoch-start probe (steps 6-7) falls inside the first."""
    extra = {"system__num_workers": workers, **overrides}
    return tiny_config(data__synthetic_size=256, budget__steps=10, measure__warmup_steps=1, measure__window_steps=2,
                       measure__windows=2, measure__profile_steps=1, measure__epoch_start_steps=2,
                       eval__at_start=False, **extra)


def test_with_workers_the_speed_phase_ends_with_an_epoch_start_whose_cost_the_throughput_spreads_over_the_epoch(
        monkeypatch, one_thread):
    iterators: list[int] = []
    loader_iter = torch.utils.data.DataLoader.__iter__

    def slow_start(self):  # each new iterator: an epoch's start that costs 0.5 s more than its steps
        iterators.append(1)
        import time
        time.sleep(0.5)
        return loader_iter(self)

    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", slow_start)
    calls: list[str] = []
    monkeypatch.setattr(measure, "synchronize", lambda device: calls.append("sync"))
    built: dict = {}
    result = engine.train(_epoch_config(2), speed_only=True,
                          callback=lambda event, payload: built.update(payload) if event == "build" else None)
    speed = result.speed
    assert len(iterators) == 2  # the first epoch's, then the probe's
    assert calls == ["sync"] * (4 + 1 + len(PHASES) + 2)  # two windows' ends, the profiled step's, the probe's ends
    assert speed.window_step_range == [1, 5] and speed.profiled_step_range == [5, 6]
    assert speed.epoch_start_step_range == [6, 8] and result.summary["steps"] == 8
    assert speed.window_throughput_img_s == pytest.approx(sum(speed.throughput_windows) / 2)  # the median of two
    assert 0.4 < speed.epoch_start_s < 5.0
    steps, ips = built["steps_per_epoch"], speed.images_per_step
    assert steps > 8
    expected = steps * ips / (steps * ips / speed.window_throughput_img_s + speed.epoch_start_s)
    assert speed.throughput_img_s == pytest.approx(expected, rel=1e-12)
    assert speed.throughput_img_s < speed.window_throughput_img_s
    assert result.summary["epoch_start_s"] == speed.epoch_start_s
    assert result.summary["window_throughput_img_s"] == speed.window_throughput_img_s


def test_without_workers_there_is_no_epoch_start_probe_and_the_throughput_is_the_windows_median(monkeypatch, one_thread):
    calls: list[str] = []
    monkeypatch.setattr(measure, "synchronize", lambda device: calls.append("sync"))
    speed = engine.train(_epoch_config(0), speed_only=True).speed
    assert calls == ["sync"] * (4 + 1 + len(PHASES)) and speed.epoch_start_s is None and speed.epoch_start_step_range == []
    assert speed.throughput_img_s == speed.window_throughput_img_s


def test_the_epoch_start_probe_trains_on_the_same_batches(one_thread):
    """The probe makes the loader's iterator afresh mid-epoch; it starts from the step's own batch, so a run
    with workers (probe) and one without (no probe) see the same data and their losses agree exactly."""
    with_probe = engine.train(_epoch_config(2))
    without = engine.train(_epoch_config(0))
    assert with_probe.speed.epoch_start_step_range == [6, 8] and without.speed.epoch_start_step_range == []
    assert len(with_probe.losses) == 10 and with_probe.losses == without.losses
    persistent = engine.train(_epoch_config(2, system__persistent_workers=True))
    assert persistent.losses == without.losses
