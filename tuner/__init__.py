"""The orchestrator: search spaces, Ray Tune trials, Optuna studies, pruning, export.

`run(space)` is the Python twin of `tuner run SPACE.yaml`; `SearchSpace.load(path)` reads a space.
"""

from tuner.space import SearchSpace

__all__ = ["SearchSpace", "run", "StudySummary"]


def __getattr__(name):
    # Ray is heavy to import; load it only when a study is run.
    if name == "run":
        from tuner.runner import run

        return run
    if name == "StudySummary":
        from tuner.summary import StudySummary

        return StudySummary
    raise AttributeError(name)
