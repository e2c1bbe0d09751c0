"""The pruning bridge: Optuna's single-objective pruners judging Ray Tune trials, one phase at a time.

Optuna's pruners judge one scalar per step, and a two-objective study cannot hold intermediate values
(`trial.report` raises for it). So each phase gets a *shadow* study: an in-memory, single-objective
Optuna study whose trials mirror the real ones and whose pruner is the configured one. The speed phase
is judged on throughput, the quality phase on kNN top-1 at each evaluation step. When the pruner says
prune, the Ray Tune scheduler stops the trial and leaves a `PruneDecision` in the ledger; the searcher
then stores the real trial as PRUNED with the phase and the reason (never as COMPLETE).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from tuner.space import PrunerPerPhase

#: The scalar each phase is judged on.
PHASE_METRIC = {"speed": "throughput_img_s", "quality": "knn_top1"}

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass
class PruneDecision:
    """Why a trial was stopped: the phase, the pruner's reason, and when."""

    phase: str
    reason: str
    step: int
    value: float
    at: float = field(default_factory=time.time)


class PhaseJudge:
    """One phase's shadow study: intermediate values in, a prune/keep verdict out."""

    def __init__(self, phase: str, pruner: optuna.pruners.BasePruner):
        self.phase, self.pruner = phase, pruner
        self.study = optuna.create_study(direction="maximize", pruner=pruner)
        self._shadows: dict[Any, optuna.trial.Trial] = {}
        self._values: dict[Any, dict[int, float]] = {}

    def _shadow(self, key: Any) -> optuna.trial.Trial:
        if key not in self._shadows:
            self._shadows[key] = self.study.ask()
            self._values[key] = {}
        return self._shadows[key]

    def report(self, key: Any, step: int, value: float) -> bool:
        """Record `value` at `step` for trial `key`; True when the pruner would prune it."""
        shadow = self._shadow(key)
        if step in self._values[key]:
            return False
        self._values[key][step] = float(value)
        shadow.report(float(value), int(step))
        return shadow.should_prune()

    def finish(self, key: Any, pruned: bool) -> None:
        """Close the shadow trial so later trials are judged against it (completed at its last value)."""
        shadow = self._shadows.pop(key, None)
        values = self._values.pop(key, {})
        if shadow is None:
            return
        if pruned or not values:
            self.study.tell(shadow, state=TrialState.PRUNED)
        else:
            self.study.tell(shadow, values[max(values)])

    def replay(self, key: Any, values: dict[int, float], pruned: bool) -> None:
        """Rebuild history from a stored trial (when a study is continued)."""
        for step, value in sorted(values.items()):
            self.report(key, step, value)
        self.finish(key, pruned)


class PruningBridge:
    """The judges of both phases and the ledger of decisions the searcher reads."""

    def __init__(self, spec: PrunerPerPhase, knn_metric: str = "knn_top1"):
        # knn_metric: the teacher's (knn_top1) or the student's (student_knn_top1) kNN, as the space's constraint
        self.metrics = {**PHASE_METRIC, "quality": knn_metric}
        self.judges = {phase: PhaseJudge(phase, s.build()) for phase, s in (("speed", spec.speed), ("quality", spec.quality))
                       if s is not None}
        self.decisions: dict[Any, PruneDecision] = {}
        self.exempt: set[Any] = set()

    def observe(self, key: Any, result: dict[str, Any]) -> PruneDecision | None:
        """Judge one result; a returned decision means: stop this trial."""
        phase = result.get("phase")
        judge = self.judges.get(phase)
        metric = self.metrics.get(phase)
        if judge is None or result.get(metric) is None:
            return None
        step = int(result.get("step", 0))
        if not judge.report(key, step, result[metric]) or key in self.exempt:
            return None
        name = type(judge.pruner).__name__
        decision = PruneDecision(phase, f"{name}: {metric}={result[metric]:.4g} at step {step}", step, float(result[metric]))
        self.decisions[key] = decision
        return decision

    def finish(self, key: Any) -> PruneDecision | None:
        """The trial ended: close its shadows; return the decision if it was pruned."""
        decision = self.decisions.pop(key, None)
        for judge in self.judges.values():
            judge.finish(key, pruned=decision is not None and decision.phase == judge.phase)
        self.exempt.discard(key)
        return decision

    def replay(self, key: Any, intermediate: dict[str, dict[int, float]], pruned_phase: str | None) -> None:
        """Feed a stored trial's intermediate values into the judges."""
        for phase, values in intermediate.items():
            if phase in self.judges and values:
                self.judges[phase].replay(key, values, pruned=pruned_phase == phase)


class PruningScheduler(FIFOScheduler):
    """A Ray Tune scheduler that stops trials the `PruningBridge` judges bad (FIFO otherwise)."""

    def __init__(self, bridge: PruningBridge):
        super().__init__()
        self.bridge = bridge

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = self.bridge.observe(trial.trial_id, result)
        if decision is not None:
            logging.getLogger(__name__).info("pruning %s: %s", trial.trial_id, decision.reason)
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE
