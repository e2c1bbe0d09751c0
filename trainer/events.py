"""What a training run tells its caller, and how a run ends.

`trainer.train(config, callback=...)` calls `callback(event, payload)` with plain dicts (JSON-able, so
the tuner can store them and the CLI can print them). The events, in order:

- ``"build"``: ``{"build_s", "device", "images_per_step", "params_m", "steps_per_epoch", "total_steps",
  "schedule_steps", "init"}`` once the model and data exist (`total_steps`: where this run ends, which
  `budget.stop_at_step` may put before the schedules' end `schedule_steps`; `init`: what `model.init` loaded).
- ``"window"``: one timed window of the speed phase: ``{"step", "window", "throughput_img_s"}``.
- ``"speed"``: the speed phase's measurement (see `SpeedReport`), after its last window.
- ``"log"``: ``{"step", "epoch", "loss", "lr", "teacher_momentum", "throughput_img_s", "teacher_entropy",
  "batch_entropy", "max_entropy"}`` every few steps; the entropies (nats) are the collapse monitor of `trainer.loss`.
- ``"eval"``: ``{"step", "epoch", "knn_top1", "knn_top5", "student_knn_top1", "student_knn_top5",
  "view_agreement", "bn_stats", "eval_s"}`` at each kNN evaluation (step 0 is the evaluation before
  training); `knn_*` are the teacher's, `student_knn_*` the student's (an EMA teacher barely moves in a
  short run; the student shows what the steps did); `bn_stats` is `eval.bn_stats`; `eval_s` the
  evaluation's wall time; `view_agreement` is how much of the teacher's output two augmented views of
  one image share (`trainer.loss.view_agreement`).
- ``"failure"``: ``{"reason", "message", "step"}`` when the run fails (see `FAIL_REASONS`).
- ``"done"``: the run's summary (the same dict as ``summary.json``).

A callback that returns ``True`` asks the run to stop after the current step; the run then ends with
``summary["stopped_early"] = True`` (used by callers that prune).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

Callback = Callable[[str, dict[str, Any]], Optional[bool]]

#: Reasons a run can fail with; callers record them as-is.
FAIL_REASONS = ("oom", "nan", "dataloader", "compile", "timeout", "error")


class TrainingFailure(RuntimeError):
    """A run that could not go on, with a machine-readable reason (one of `FAIL_REASONS`)."""

    def __init__(self, reason: str, message: str, step: int | None = None):
        super().__init__(f"{reason}: {message}" + (f" (step {step})" if step is not None else ""))
        self.reason = reason
        self.message = message
        self.step = step

    def as_dict(self) -> dict[str, Any]:
        """The failure as the ``"failure"`` event payload."""
        return {"reason": self.reason, "message": self.message, "step": self.step}


@dataclass
class SpeedReport:
    """The speed phase, measured end to end including data loading; warm-up excluded.

    ``window_throughput_img_s`` is the median over windows, timed at the windows' ends only (optimizer
    steps ``window_step_range``); ``throughput_spread`` is (max - min) / median of the windows; ``step_ms``
    the windows' mean time per step. With DataLoader workers, ``epoch_start_s`` is what an epoch's start
    adds (the loader's iterator made afresh before the steps ``epoch_start_step_range``, timed against the
    windows' step time) and ``throughput_img_s`` the windows' median with it spread over an epoch's steps;
    without workers (or with the probe cut off by the budget) it is the windows' median, and
    ``epoch_start_s`` is None. ``phases_ms`` (mean time per step in each phase) and
    ``data_wait_fraction`` (the share of step time spent waiting for the next batch) come from the
    separate profiled steps ``profiled_step_range``, synchronized at every phase on a GPU.
    """

    throughput_img_s: float
    throughput_spread: float
    throughput_windows: list[float]
    data_wait_fraction: float
    phases_ms: dict[str, float]
    step_ms: float
    peak_memory_mb: float
    memory_kind: str
    images_per_step: int
    warmup_steps: int
    timed_steps: int
    first_step_s: float
    compile_s: float
    build_s: float
    extra: dict[str, Any] = field(default_factory=dict)
    profiled_step_ms: float = 0.0
    window_step_range: list[int] = field(default_factory=list)
    profiled_step_range: list[int] = field(default_factory=list)
    window_throughput_img_s: float | None = None
    epoch_start_s: float | None = None
    epoch_start_step_range: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for events, JSON and the tuner's storage."""
        return asdict(self)


#: The phases timed per step, in the order a step runs them.
PHASES = ("data", "augment", "teacher_forward", "student_forward", "loss", "backward", "optimizer", "ema")
