"""Knob classes: what each `TrainConfig` field does to training, declared once.

A speedup is only worth having with a quality verdict, and which verdict applies depends on what the
knob changes:

- ``exact``: the knob must not change what training computes (DataLoader workers, pinned memory,
  channels_last, torch.compile, fused AdamW, gradient checkpointing, concatenating same-size crops).
  Judged by **parity**: the same seed, data, augmentation and initial weights, a few steps of each,
  compared within float round-off (`trainer.parity`).
- ``approximate``: the knob changes the arithmetic within a known numerical band (reduced precision,
  TF32). Judged by parity against a band measured from the fp32 trajectory over several seeds.
- ``method``: the knob changes what is learned (crops, head sizes, batch size and lr, schedules,
  loss pairings, augmentation, data). Parity cannot judge it; its quality needs a kNN check.

Fields in `NOT_KNOBS` say how a run is measured, evaluated, seeded or placed; they never are knobs.
A field in neither table is refused as a knob (`knob_class` raises), so a new `TrainConfig` field
must be declared here before a search space may vary it; a test checks every field is in one table.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

from trainer.config import ConfigError

KnobClass = Literal["exact", "approximate", "method"]
EXACT: KnobClass = "exact"
APPROXIMATE: KnobClass = "approximate"
METHOD: KnobClass = "method"

#: Every `TrainConfig` field a search space may vary, with its class.
KNOB_CLASSES: dict[str, KnobClass] = {
    # -- exact: the same math, computed differently -------------------------------------------------
    "optim.fused": EXACT,
    "system.channels_last": EXACT,
    "system.compile": EXACT,
    "system.compile_dynamic": EXACT,
    "system.cudnn_benchmark": EXACT,
    "system.grad_checkpointing": EXACT,
    "system.num_workers": EXACT,
    "system.prefetch_factor": EXACT,
    "system.pin_memory": EXACT,
    "system.persistent_workers": EXACT,
    # -- approximate: the same math in lower precision ----------------------------------------------
    "system.precision": APPROXIMATE,
    "system.tf32": APPROXIMATE,
    # -- method: changes what is learned ------------------------------------------------------------
    "data.image_size": METHOD,
    "data.canvases_per_digit": METHOD,
    "data.max_images": METHOD,
    "crops.global_crops": METHOD,
    "crops.local_crops": METHOD,
    "crops.global_size": METHOD,
    "crops.local_size": METHOD,
    "crops.global_scale": METHOD,
    "crops.local_scale": METHOD,
    "augment.flip": METHOD,
    "augment.color_jitter": METHOD,
    "augment.blur": METHOD,
    "augment.solarization": METHOD,
    "model.backbone": METHOD,
    "model.stem": METHOD,
    "model.width": METHOD,
    "model.patch_size": METHOD,
    "model.vit_depth": METHOD,
    "model.head.out_dim": METHOD,
    "model.head.hidden_dim": METHOD,
    "model.head.bottleneck_dim": METHOD,
    "model.head.nlayers": METHOD,
    "model.head.norm_last_layer": METHOD,
    "model.head.use_bn": METHOD,
    "loss.student_temp": METHOD,
    "loss.teacher_temp": METHOD,
    "loss.warmup_teacher_temp": METHOD,
    "loss.warmup_teacher_temp_epochs": METHOD,
    "loss.center_momentum": METHOD,
    "loss.pairing": METHOD,
    "optim.batch_size": METHOD,
    "optim.accumulation_steps": METHOD,
    "optim.lr": METHOD,
    "optim.min_lr": METHOD,
    "optim.warmup_epochs": METHOD,
    "optim.weight_decay": METHOD,
    "optim.weight_decay_end": METHOD,
    "optim.momentum_teacher": METHOD,
    "optim.clip_grad": METHOD,
    "optim.freeze_last_layer_epochs": METHOD,
    "budget.epochs": METHOD,
    "budget.steps": METHOD,
}

#: Fields that are never knobs, with why. Parity ignores differences in them, except where noted.
NOT_KNOBS: dict[str, str] = {
    "data.dataset": "the data set is what is trained on, not a speed setting",
    "data.root": "a path",
    "data.download": "a permission",
    "data.val_fraction": "the kNN evaluation's split",
    "data.split_seed": "the kNN evaluation's split",
    "data.digit_scale": "the embedded data set's definition",
    "data.clutter": "the embedded data set's definition",
    "data.noise_std": "the embedded data set's definition",
    "data.synthetic_size": "the synthetic data set's definition",
    "data.synthetic_classes": "the synthetic data set's definition",
    "model.init": "the starting weights (a warm start), the same for every trial of a study",
    "system.device": "the hardware a run is on, not a setting of it",
    "system.seed": "a replicate, not a knob (the study runs seeds itself)",
    "system.compile_fallback": "what to do when compiling fails, not how fast a run is",
    "system.host_allocator": "a setting of the whole process, which a run cannot undo for the next run in it "
                             "(freed blocks stay in the heap), so every run of a study shares one",
    "budget.time_limit_s": "a wall-clock limit",
    "budget.stop_at_step": "where a run segment ends (set by the study's trial budget and promotion rungs)",
    "eval.knn_k": "the evaluation's definition",
    "eval.knn_temperature": "the evaluation's definition",
    "eval.every_epochs": "when to evaluate",
    "eval.every_steps": "when to evaluate",
    "eval.at_start": "when to evaluate",
    "eval.batch_size": "the evaluation's batching",
    "eval.bn_stats": "the evaluation's definition",
    "eval.bn_images": "the evaluation's definition",
    "measure.warmup_steps": "how the speed phase measures (set by the study's trial budget)",
    "measure.window_steps": "how the speed phase measures (set by the study's trial budget)",
    "measure.windows": "how the speed phase measures (set by the study's trial budget)",
    "measure.profile_steps": "how the speed phase measures (set by the study's trial budget)",
    "measure.epoch_start_steps": "how the speed phase measures (set by the study's trial budget)",
    "checkpoint_every_steps": "when to write checkpoints",
}

#: Knobs whose class depends on the model, with why. Concatenating same-size crops gives one backbone
#: forward over all of them: with BatchNorm, its batch statistics then span every crop of the batch
#: rather than one, which changes the math (parity measures a 100% change); LayerNorm (ViT) normalizes
#: each token alone, so there it is exact.
CONDITIONAL: dict[str, tuple[Callable[[dict[str, Any]], KnobClass], str]] = {
    "crops.concat_same_resolution": (
        lambda config: EXACT if str(config.get("model", {}).get("backbone", "")).startswith("vit") else METHOD,
        "with a BatchNorm backbone, concatenated crops share BatchNorm's batch statistics",
    ),
}

_ORDER = {EXACT: 0, APPROXIMATE: 1, METHOD: 2}


def knob_class(path: str, config: dict[str, Any] | None = None) -> KnobClass:
    """The class of the `TrainConfig` field at dotted `path` (for a conditional knob, in `config`'s
    model; without a config, the wider class); a one-line `ConfigError` for a non-knob."""
    if path in CONDITIONAL:
        return CONDITIONAL[path][0](config or {})
    if path in KNOB_CLASSES:
        return KNOB_CLASSES[path]
    if path in NOT_KNOBS:
        raise ConfigError(f"{path} is not a knob: {NOT_KNOBS[path]}")
    raise ConfigError(f"{path} has no knob class (declare it in trainer/knobs.py as exact, approximate or method)")


def knob_note(path: str, config: dict[str, Any] | None = None) -> str | None:
    """Why a conditional knob has the class it has in `config`'s model (None for other knobs)."""
    if path in CONDITIONAL and knob_class(path, config) == METHOD:
        return CONDITIONAL[path][1]
    return None


def group_class(paths, config: dict[str, Any] | None = None) -> KnobClass:
    """The widest class among `paths` (method > approximate > exact): a group is only as exact as its least exact field."""
    classes = [knob_class(p, config) for p in paths]
    return max(classes, key=_ORDER.__getitem__) if classes else EXACT


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config data as {dotted path: leaf value}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def differences(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{path: (value in a, value in b)} for every leaf that differs between two configs' plain data."""
    fa, fb = flatten(a), flatten(b)
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}
