"""The measured loop: the speed report, the order of events, stopping from a callback, failures returned
with a reason (never raised), and the `trainer train` / `trainer bench` commands end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from trainer import FAIL_REASONS, TrainConfig, train
from trainer.cli import main
from trainer.events import PHASES

from trainer_tiny import TINY_STEPS_PER_EPOCH, one_thread, tiny_config  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def measured_run():
    """One tiny run of 6 steps (1 warm-up step, then 2 windows of 2 steps), with every event recorded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    events: list[tuple[str, dict]] = []
    result = train(tiny_config(), callback=lambda event, payload: events.append((event, payload)))
    torch.set_num_threads(before)
    return result, events


def test_speed_report_has_the_configured_windows_and_sane_numbers(measured_run):
    result, _ = measured_run
    assert result.status == "ok"
    sp = result.speed
    assert len(sp.throughput_windows) == 2 and sp.timed_steps == 4 and sp.warmup_steps == 1
    assert all(w > 0 for w in sp.throughput_windows)
    assert min(sp.throughput_windows) <= sp.throughput_img_s <= max(sp.throughput_windows)
    assert sp.throughput_spread == pytest.approx(
        (max(sp.throughput_windows) - min(sp.throughput_windows)) / sp.throughput_img_s)
    assert sp.images_per_step == 16
    assert set(sp.phases_ms) == set(PHASES)
    assert all(ms >= 0 for ms in sp.phases_ms.values())
    for phase in ("augment", "teacher_forward", "student_forward", "backward", "optimizer"):
        assert sp.phases_ms[phase] > 0, phase
    assert sum(sp.phases_ms.values()) <= sp.profiled_step_ms * 1.05  # the phases of the profiled steps
    assert 0.0 <= sp.data_wait_fraction <= 1.0
    assert sp.peak_memory_mb > 0 and sp.memory_kind == "cpu_peak_rss"
    assert sp.build_s > 0 and sp.first_step_s > 0 and sp.compile_s == 0.0


def test_events_arrive_in_order(measured_run):
    result, events = measured_run
    names = [e for e, _ in events]
    assert names[0] == "build" and names[-1] == "done"
    assert names[1] == "eval" and events[1][1]["step"] == 0
    window_at = [i for i, n in enumerate(names) if n == "window"]
    speed_at = names.index("speed")
    assert len(window_at) == 2 and window_at[-1] < speed_at
    assert [events[i][1]["window"] for i in window_at] == [1, 2]
    assert [events[i][1]["step"] for i in window_at] == [3, 5]  # 1 warm-up step, then windows of 2
    final_eval = max(i for i, n in enumerate(names) if n == "eval")
    assert speed_at < final_eval < len(names) - 1 and events[final_eval][1]["step"] == 6
    logs = [p for e, p in events if e == "log"]
    assert [p["step"] for p in logs] == [3, 6] and all(p["loss"] > 0 for p in logs)
    ln_k = math.log(tiny_config().model.head.out_dim)
    for p in logs:  # the collapse monitor rides on every log event
        assert p["max_entropy"] == pytest.approx(ln_k)
        assert 0.0 <= p["teacher_entropy"] <= p["batch_entropy"] + 1e-6 <= ln_k + 1e-6
    assert "failure" not in names
    assert events[-1][1] == result.summary
    build = events[0][1]
    assert build["images_per_step"] == 16 and build["total_steps"] == 6 and build["steps_per_epoch"] == TINY_STEPS_PER_EPOCH


def test_summary_of_a_finished_run(measured_run):
    result, events = measured_run
    s = result.summary
    assert s["status"] == "ok" and s["steps"] == 6 and s["epochs"] == 6 / TINY_STEPS_PER_EPOCH
    assert s["stopped_early"] is False and s["failure"] is None
    assert len(result.losses) == 6 and all(loss > 0 for loss in result.losses)
    assert s["final_loss"] == result.losses[-1]
    for key in ("knn_top1", "knn_top5", "knn_top1_initial"):
        assert 0.0 <= s[key] <= 100.0
    assert s["knn_top5"] >= s["knn_top1"]
    assert s["throughput_img_s"] == result.speed.throughput_img_s
    assert s["wall_s"] >= s["train_s"] > 0
    last_log = [p for e, p in events if e == "log"][-1]
    assert s["teacher_entropy"] == last_log["teacher_entropy"] and s["batch_entropy"] == last_log["batch_entropy"]
    evals = [p for e, p in events if e == "eval"]
    assert s["view_agreement_initial"] == evals[0]["view_agreement"]
    assert s["view_agreement"] == evals[-1]["view_agreement"]
    assert all(-1.0 <= p["view_agreement"] <= 1.0 for p in evals)


def test_callback_returning_true_stops_the_run_early():
    seen: list[str] = []

    def stop_at_first_log(event, payload):
        seen.append(event)
        return event == "log"

    result = train(tiny_config(eval__at_start=False), callback=stop_at_first_log)
    assert result.status == "ok"
    assert result.summary["stopped_early"] is True
    assert result.summary["steps"] == TINY_STEPS_PER_EPOCH < 6
    assert len(result.losses) == TINY_STEPS_PER_EPOCH
    assert seen.count("log") == 1 and seen[-1] == "done"


# ---- failures ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec,reason,step", [("nan@2", "nan", 2), ("grad@3", "nan", 3), ("oom@1", "oom", 1)])
def test_injected_fault_ends_the_run_with_its_reason(spec, reason, step, monkeypatch, tmp_path):
    monkeypatch.setenv("TRAINER_INJECT_FAULT", spec)
    events: list[tuple[str, dict]] = []
    result = train(tiny_config(eval__at_start=False), callback=lambda e, p: events.append((e, p)), out_dir=tmp_path)
    assert result.status == "failed" and reason in FAIL_REASONS
    assert result.failure["reason"] == reason and result.failure["step"] == step
    assert len(result.losses) == step  # the steps before the fault completed
    assert events[-1] == ("failure", result.failure)
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["status"] == "failed" and written["failure"]["reason"] == reason and written["steps"] == step


def test_non_finite_gradient_stops_before_the_update_and_names_the_parameter(monkeypatch, tmp_path):
    # The loss stays finite; one gradient does not (as bf16 convolutions on some CPUs produce). The run
    # stops at that step, before the optimizer writes NaN into the weights, and says which parameter.
    monkeypatch.setenv("TRAINER_INJECT_FAULT", "grad@1")
    result = train(tiny_config(eval__at_start=False), out_dir=tmp_path)
    assert result.status == "failed" and result.failure["step"] == 1
    assert result.failure["message"] == "non-finite gradient norm in backbone.net.conv1.weight (precision fp32)"
    assert len(result.losses) == 1 and math.isfinite(result.losses[0])
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["failure"] == result.failure


def test_dead_dataloader_worker_is_reason_dataloader(monkeypatch):
    # The worker process calls os._exit(1) while fetching its second batch: a real worker death.
    monkeypatch.setenv("TRAINER_INJECT_FAULT", "dataloader@2")
    result = train(tiny_config(eval__at_start=False, system__num_workers=1))
    assert result.status == "failed"
    assert result.failure["reason"] == "dataloader"
    assert "exited unexpectedly" in result.failure["message"]
    assert result.failure["step"] <= 2


# ---- the commands ------------------------------------------------------------------------------


def test_cli_train_writes_summary_config_and_checkpoint(tmp_path, capsys):
    cfg_path = tiny_config().save(tmp_path / "tiny.yaml")
    out = tmp_path / "run"
    assert main(["train", str(cfg_path), "--out", str(out), "--quiet"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "ok" and s["steps"] == 6 and s["epochs"] == 2.0
    for key in ("knn_top1", "knn_top5", "knn_top1_initial"):
        assert 0.0 <= s[key] <= 100.0
    assert s["throughput_img_s"] > 0 and s["peak_memory_mb"] > 0 and s["wall_s"] > 0
    assert s["world_size"] == 1 and s["device"] == "cpu"
    assert (out / "checkpoint.pt").is_file()
    assert TrainConfig.load(out / "config.yaml") == tiny_config()
    stdout = capsys.readouterr().out
    assert "kNN top-1 (%)" in stdout and str(out / "summary.json") in stdout


def test_cli_bench_json_prints_the_speed_report(tmp_path, capsys):
    cfg_path = tiny_config(eval__at_start=False).save(tmp_path / "tiny.yaml")
    assert main(["bench", str(cfg_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["throughput_img_s"] > 0 and report["throughput_spread"] >= 0
    assert 0.0 <= report["data_wait_fraction"] <= 1.0
    assert set(report["phases_ms"]) == set(PHASES) and report["peak_memory_mb"] > 0
    assert report["timed_steps"] == 4 and len(report["throughput_windows"]) == 2
    assert not (tmp_path / "runs").exists()


def test_log_jsonl_has_a_line_per_log_step_and_per_evaluation_written_as_the_run_goes(tmp_path):
    out = tmp_path / "run"
    seen_while_running: list[int] = []

    def count_lines(event, payload):  # the file is readable mid-run, as a plotting script would read it
        if event == "eval":
            seen_while_running.append(len((out / "log.jsonl").read_text().splitlines()))

    result = train(tiny_config(eval__every_steps=3), callback=count_lines, out_dir=out)
    assert result.status == "ok"
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(d["kind"], d["step"]) for d in lines] == [("eval", 0), ("train", 3), ("eval", 3), ("train", 6), ("eval", 6)]
    assert seen_while_running == [1, 3, 5]
    train_lines = [d for d in lines if d["kind"] == "train"]
    assert [d["epoch"] for d in train_lines] == [1.0, 2.0]  # 3 steps an epoch: one line per epoch
    assert [d["loss"] for d in train_lines] == pytest.approx([result.losses[2], result.losses[5]])
    assert all(0.996 <= d["teacher_momentum"] <= 1.0 and d["lr"] > 0 and d["throughput_img_s"] > 0 for d in train_lines)
    assert train_lines[0]["teacher_momentum"] < train_lines[1]["teacher_momentum"]  # cosine towards 1
    assert train_lines[-1]["teacher_entropy"] == pytest.approx(result.summary["teacher_entropy"])
    evals = [d for d in lines if d["kind"] == "eval"]
    assert evals[0]["knn_top1"] == pytest.approx(result.summary["knn_top1_initial"])
    assert evals[-1]["knn_top1"] == pytest.approx(result.summary["knn_top1"])
    assert set(evals[0]) == {"kind", "step", "epoch", "knn_top1", "knn_top5", "view_agreement"}


def test_logged_throughput_leaves_out_evaluations_and_checkpoints_wherever_they_fall(monkeypatch, tmp_path):
    """Log lines every 3 steps (an epoch), evaluations every 2 and a checkpoint at each epoch's end, each made
    0.25 s slower: a log line's throughput is its steps' images over their own time, never over less (the
    interval restarted at an evaluation between two log lines) and not with the 0.25 s pauses in it."""
    import time

    from trainer import engine

    step_s: dict[int, float] = {}
    train_step, evaluate, save = engine.Run.train_step, engine.Run.evaluate, engine.Run.save_checkpoint

    def timed_step(self, batches):
        t0 = time.perf_counter()
        loss = train_step(self, batches)
        step_s[self.step + 1] = time.perf_counter() - t0
        return loss

    def slow(original):
        return lambda self, *a: (time.sleep(0.25), original(self, *a))[1]

    monkeypatch.setattr(engine.Run, "train_step", timed_step)
    monkeypatch.setattr(engine.Run, "evaluate", slow(evaluate))
    monkeypatch.setattr(engine.Run, "save_checkpoint", slow(save))
    logs = []
    result = train(tiny_config(budget__steps=12, eval__every_steps=2, eval__at_start=False), out_dir=tmp_path,
                   callback=lambda event, payload: logs.append(payload) if event == "log" else None)
    assert result.status == "ok" and [e["step"] for e in logs] == [3, 6, 9, 12]
    previous = 0
    for entry in logs:
        steps = range(previous + 1, entry["step"] + 1)
        own_time = len(steps) * result.summary["images_per_step"] / sum(step_s[s] for s in steps)
        assert entry["throughput_img_s"] <= own_time * (1 + 1e-9), (entry, own_time)  # never over less than its steps
        assert entry["throughput_img_s"] > 0.5 * own_time, (entry, own_time)  # the 0.25 s pauses are not in it
        previous = entry["step"]
