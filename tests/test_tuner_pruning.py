"""The pruning bridge: Optuna's pruners judging each phase on one scalar, with baseline trials exempt."""

from __future__ import annotations

from tuner.pruning import PruningBridge
from tuner.space import PrunerPerPhase


def test_median_pruner_stops_a_slow_trial_in_the_speed_phase_only_after_startup_trials():
    bridge = PruningBridge(PrunerPerPhase(speed={"name": "MedianPruner", "args": {"n_startup_trials": 2}}))
    for key, tp in (("a", 100.0), ("b", 80.0)):
        assert bridge.observe(key, {"phase": "speed", "step": 0, "throughput_img_s": tp}) is None
        assert bridge.finish(key) is None
    decision = bridge.observe("slow", {"phase": "speed", "step": 0, "throughput_img_s": 10.0})
    assert decision is not None and decision.phase == "speed" and "MedianPruner" in decision.reason
    assert bridge.finish("slow") is decision
    assert bridge.observe("fast", {"phase": "speed", "step": 0, "throughput_img_s": 120.0}) is None
    # the quality phase has no pruner here: never judged
    assert bridge.observe("fast", {"phase": "quality", "step": 4, "knn_top1": 0.0}) is None


def test_threshold_pruner_judges_quality_on_knn_at_each_step_and_spares_exempt_trials():
    bridge = PruningBridge(PrunerPerPhase(speed="none", quality={"name": "ThresholdPruner", "args": {"lower": 50.0}}))
    assert bridge.judges.keys() == {"quality"}
    bridge.exempt.add("baseline")
    assert bridge.observe("baseline", {"phase": "quality", "step": 4, "knn_top1": 10.0}) is None
    assert bridge.observe("t1", {"phase": "quality", "step": 4, "knn_top1": 60.0}) is None
    decision = bridge.observe("t1", {"phase": "quality", "step": 8, "knn_top1": 40.0})
    assert decision.phase == "quality" and decision.step == 8 and decision.value == 40.0


def test_replayed_history_counts_as_startup_trials_after_a_restart():
    spec = PrunerPerPhase(speed={"name": "MedianPruner", "args": {"n_startup_trials": 2}})
    bridge = PruningBridge(spec)
    bridge.replay("stored-0", {"speed": {0: 100.0}}, None)
    bridge.replay("stored-1", {"speed": {0: 90.0}}, None)
    assert bridge.observe("new", {"phase": "speed", "step": 0, "throughput_img_s": 5.0}) is not None
