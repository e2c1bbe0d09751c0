"""The shared DINO trainer: one config, real multi-crop DINO training, kNN evaluation, honest timing."""

from trainer.config import ConfigError, TrainConfig
from trainer.events import FAIL_REASONS, SpeedReport, TrainingFailure

__all__ = ["ConfigError", "TrainConfig", "FAIL_REASONS", "SpeedReport", "TrainingFailure", "train", "RunResult"]


def __getattr__(name):
    # The engine imports torch; keep `import trainer` light for config-only users (YAML checks, the tuner's driver).
    if name in ("train", "RunResult"):
        from trainer import engine

        return getattr(engine, name)
    raise AttributeError(name)
