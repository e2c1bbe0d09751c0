"""The trial function Ray Tune runs: one `trainer.train` call, its events turned into phase reports.

Reports, in order: one ``phase: "speed"`` result when the speed phase ends (throughput), one
``phase: "quality"`` result per kNN evaluation after it (the teacher's ``knn_top1`` and the student's
``student_knn_top1``; the searcher and pruner read the one ``constraints.knn_backbone`` names; the
evaluation before training becomes ``knn_top1_initial``; evaluations that happen during the speed phase
are held back until it ends, so a pruner always sees the phases in order), and a last result with
``phase: "done"`` (the run's summary) or ``phase: "failed"`` (``fail_reason``: oom, nan, dataloader,
compile, timeout, error, invalid_config). The trainer's loop is not changed: a stop request is the
callback returning True.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

#: Summary fields a finished trial reports (and the searcher stores).
SUMMARY_FIELDS = ("throughput_img_s", "throughput_spread", "world_size", "images_per_step", "knn_top1", "knn_top5", "knn_top1_initial",
                  "student_knn_top1", "student_knn_top5", "student_knn_top1_initial", "bn_stats",
                  "view_agreement_initial", "view_agreement", "teacher_entropy", "max_entropy",
                  "data_wait_fraction", "phases_ms", "peak_memory_mb", "memory_kind", "steps", "wall_s",
                  "build_s", "compile_s", "train_s", "stopped_early", "host_allocator", "window_throughput_img_s",
                  "epoch_start_s")


def run_trial(spec: dict[str, Any]) -> None:
    """Ray Tune trainable: `spec` is what the searcher suggested (config, trial overrides, env, cpus, timeout)."""
    # the environment is restored afterwards: with `ray.reuse_actors` the next trial runs in this process
    with _environment({k: str(v) for k, v in (spec.get("env") or {}).items()}):
        _run(spec)


@contextlib.contextmanager
def _environment(env: dict[str, str]):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run(spec: dict[str, Any]) -> None:
    import ray
    from ray import tune

    import torch

    from trainer import ConfigError, TrainConfig, train
    from tuner.study import hardware_fingerprint

    workers = max(1, int(spec.get("workers") or 1))
    threads = max(1, int(spec.get("cpus") or 1) // workers)
    torch.set_num_threads(threads)
    timeout_s = float(spec["timeout_s"])
    # A trial stuck inside one step never reaches the callback; end its process well after the timeout.
    watchdog = threading.Timer(timeout_s + max(30.0, 0.2 * timeout_s), lambda: os._exit(124))
    watchdog.daemon = True
    watchdog.start()
    node = {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address()}
    report = lambda result: tune.report({**result, **node})  # noqa: E731  (every result names its Ray node)
    reporter = _PhaseReporter(report, timeout_s)
    try:
        config = TrainConfig.from_dict(spec["config"], source=f"trial {spec['number']}")
        config = config.with_overrides(spec["trial_overrides"], source=f"trial {spec['number']}")
        # with promotion rungs the trial keeps its checkpoint there: a promoted trial continues from it
        with ranks(config, workers, threads):  # rank 0 is this process; the others are its children
            result = train(config, callback=reporter, out_dir=spec.get("out_dir"))
    except ConfigError as exc:
        report({"phase": "failed", "fail_reason": "invalid_config", "fail_message": str(exc)})
        return
    finally:
        watchdog.cancel()
    hardware = hardware_fingerprint()
    if reporter.timed_out:
        report({"phase": "failed", "fail_reason": "timeout", "hardware": hardware,
                     "fail_message": f"trial ran past {timeout_s:.0f} s", "fail_step": result.summary.get("steps")})
    elif result.status != "ok":
        failure = result.failure or {}
        report({"phase": "failed", "fail_reason": failure.get("reason", "error"), "hardware": hardware,
                     "fail_message": failure.get("message", ""), "fail_step": failure.get("step"),
                     "throughput_img_s": reporter.throughput, "knn_top1_initial": reporter.knn_initial,
                     "student_knn_top1_initial": reporter.knn_initial})  # equal before training
    else:
        summary = {k: result.summary.get(k) for k in SUMMARY_FIELDS}
        evals, student_evals = ({int(e["step"]): float(e[key]) for e in result.summary.get("evals", []) if e.get(key) is not None}
                                for key in ("knn_top1", "student_knn_top1"))
        report({"phase": "done", **summary, "evals": evals, "student_evals": student_evals, "hardware": hardware})


class _PhaseReporter:
    """The `train` callback: forwards the speed phase, then each kNN evaluation, to Ray Tune."""

    def __init__(self, report, timeout_s: float):
        self.report, self.timeout_s = report, timeout_s
        self.t0 = time.monotonic()
        self.total_steps: int | None = None
        self.throughput: float | None = None
        self.knn_initial: float | None = None
        self.held: list[dict[str, Any]] = []
        self.timed_out = False

    def __call__(self, event: str, payload: dict[str, Any]) -> bool:
        if event == "build":
            self.total_steps = payload.get("total_steps")
        elif event == "speed":
            self.throughput = payload["throughput_img_s"]
            self.report({"phase": "speed", "step": 0, "throughput_img_s": payload["throughput_img_s"],
                         "throughput_spread": payload["throughput_spread"], "peak_memory_mb": payload["peak_memory_mb"]})
            for held in self.held:
                self._quality(held)
            self.held = []
        elif event == "eval" and payload.get("knn_top1") is not None:
            if payload["step"] == 0:
                self.knn_initial = payload["knn_top1"]
            elif self.throughput is None:
                self.held.append(payload)
            elif payload["step"] != self.total_steps:  # the last evaluation arrives with "done"
                self._quality(payload)
        if time.monotonic() - self.t0 > self.timeout_s:
            self.timed_out = True
            return True
        return False

    def _quality(self, payload: dict[str, Any]) -> None:
        self.report({"phase": "quality", "step": int(payload["step"]), "knn_top1": payload["knn_top1"],
                     "student_knn_top1": payload.get("student_knn_top1")})


@contextlib.contextmanager
def ranks(config, workers: int, threads: int):
    """A trial as a DDP job of `workers` processes on this node (`ray.workers_per_trial`): this process is
    rank 0 (it reports to Ray Tune; its throughput counts every rank's images, as the trainer's does under
    torchrun), ranks 1.. run `train` on the same config in child processes, `threads` torch threads each."""
    if workers <= 1:
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    shared = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(workers)}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(config.to_dict(), f)
    children = [subprocess.Popen([sys.executable, "-m", "tuner.trial", f.name, str(threads)],
                                 env={**os.environ, **shared, "RANK": str(r), "LOCAL_RANK": str(r)})
                for r in range(1, workers)]
    try:
        with _environment({**shared, "RANK": "0", "LOCAL_RANK": "0"}):
            yield
    finally:
        for child in children:
            try:
                child.wait(timeout=120)
            except subprocess.TimeoutExpired:
                child.kill()
        os.unlink(f.name)


def _rank_main(argv: list[str]) -> int:
    """A rank > 0 of a multi-process trial: `python -m tuner.trial CONFIG.json THREADS` (see `ranks`)."""
    import torch

    from trainer import TrainConfig, train

    torch.set_num_threads(int(argv[1]))
    with open(argv[0]) as f:
        config = TrainConfig.from_dict(json.load(f), source="trial rank")
    return 0 if train(config).status == "ok" else 1


if __name__ == "__main__":
    sys.exit(_rank_main(sys.argv[1:]))
