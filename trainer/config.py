"""`TrainConfig`: one pydantic model that fully describes a training run.

A config is data. It is loaded from YAML, written back to YAML without loss, and overridden from the
command line with dotted paths (`--set model.head.out_dim=32768`). Every field carries its default and
a description, so the file `configs/default.yaml` and this module together are the whole recipe.

Errors a user can cause (an unknown key, a value out of range, a malformed override) are raised as
`ConfigError`, whose message is a single line naming the file, the field and what is allowed.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A user's mistake in a config file or override; its message is one line meant for the user."""


class _Strict(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Scale = tuple[float, float]


class DataConfig(_Strict):
    """Where images come from and how the validation split is made."""

    dataset: Literal["digits", "imagefolder", "cifar10", "stl10", "synthetic"] = Field(
        "digits",
        description="digits: scikit-learn's digits placed on cluttered canvases (embedded, no download); "
        "imagefolder: class-per-folder images under `root`; cifar10/stl10: torchvision sets, "
        "downloaded only when `download: true`; synthetic: random tensors for tests and benchmarks.",
    )
    root: Path | None = Field(None, description="Data folder for imagefolder, cifar10 and stl10.")
    download: bool = Field(False, description="Allow torchvision to download cifar10/stl10 into `root`.")
    image_size: int = Field(32, ge=8, le=1024, description="Side of the stored images (canvas size for digits).")
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="Fraction held out as kNN queries.")
    split_seed: int = Field(0, description="Seed of the train/validation split and of the digits canvases.")
    canvases_per_digit: int = Field(
        1, ge=1, le=16, description="digits: canvases made from each training digit (validation uses one)."
    )
    digit_scale: Scale = Field((0.45, 0.8), description="digits: digit side as a fraction of the canvas side.")
    clutter: int = Field(3, ge=0, le=32, description="digits: distractor strokes drawn on each canvas.")
    noise_std: float = Field(0.08, ge=0.0, le=1.0, description="digits: std of the pixel noise on canvases.")
    synthetic_size: int = Field(512, ge=16, description="synthetic: number of images.")
    synthetic_classes: int = Field(10, ge=2, description="synthetic: number of classes.")
    max_images: int | None = Field(None, ge=16, description="Use at most this many training images.")

    @model_validator(mode="after")
    def _root_needed(self) -> "DataConfig":
        if self.dataset in ("imagefolder", "cifar10", "stl10") and self.root is None:
            raise ValueError(f"dataset {self.dataset!r} needs data.root (a folder)")
        return self


class CropsConfig(_Strict):
    """Multi-crop: how many global and local views, their sizes and the area fractions they cover."""

    global_crops: int = Field(2, ge=1, le=4, description="Number of global views (the teacher sees these).")
    local_crops: int = Field(2, ge=0, le=16, description="Number of local (small) views, student only.")
    global_size: int = Field(32, ge=8, le=1024, description="Side of a global crop in pixels.")
    local_size: int = Field(16, ge=4, le=1024, description="Side of a local crop in pixels.")
    global_scale: Scale = Field((0.4, 1.0), description="Area fraction range of a global crop.")
    local_scale: Scale = Field((0.05, 0.4), description="Area fraction range of a local crop.")
    concat_same_resolution: bool = Field(
        True,
        description="Run crops of the same size through the backbone in one concatenated forward "
        "(DINO's MultiCropWrapper); false runs one forward per crop.",
    )

    @field_validator("global_scale", "local_scale")
    @classmethod
    def _scale_range(cls, v: Scale) -> Scale:
        lo, hi = v
        if not (0.0 < lo <= hi <= 1.0):
            raise ValueError("must be [low, high] with 0 < low <= high <= 1")
        return v


class AugmentConfig(_Strict):
    """Augmentation cost knobs. Augmentation runs on whole batches of tensors, on the training device."""

    flip: bool = Field(True, description="Random horizontal flip.")
    color_jitter: bool = Field(True, description="Brightness/contrast/saturation jitter (p=0.8) and grayscale (p=0.2).")
    blur: bool = Field(True, description="Gaussian blur (p=1.0 on the first global view, 0.1 on the second, 0.5 local).")
    solarization: bool = Field(True, description="Solarization on the second global view (p=0.2).")


class HeadConfig(_Strict):
    """The DINO projection head: MLP, L2-normalized bottleneck, weight-normalized last layer."""

    out_dim: int = Field(65536, ge=2, description="Prototypes (output dimension K).")
    hidden_dim: int = Field(2048, ge=8, description="Hidden width of the MLP.")
    bottleneck_dim: int = Field(256, ge=2, description="Bottleneck width before the last layer.")
    nlayers: int = Field(3, ge=1, le=5, description="Layers in the MLP.")
    norm_last_layer: bool = Field(True, description="Fix the last layer's weight-norm gain at 1.")
    use_bn: bool = Field(False, description="BatchNorm in the head MLP.")


class ModelConfig(_Strict):
    """Backbone and head."""

    backbone: Literal["resnet18", "resnet50", "vit_tiny", "vit_small"] = Field("resnet18", description="torchvision backbone.")
    stem: Literal["imagenet", "small", "cifar"] = Field(
        "imagenet",
        description="ResNet stem: imagenet (7x7/2 conv + max-pool, input/4), small (3x3/1 conv + max-pool, "
        "input/2: a 2x2 last stage at 32 px) or cifar (3x3/1 conv, no pool, input/1).",
    )
    width: int = Field(64, ge=8, le=256, description="ResNet: channels of the first stage (64 is torchvision's).")
    patch_size: int = Field(16, ge=2, le=32, description="ViT patch size.")
    vit_depth: int | None = Field(None, ge=1, le=24, description="ViT: number of blocks (None: 12).")
    init: str | None = Field(
        None, min_length=1,
        description="Warm start of the backbone (student and teacher alike; the head always starts fresh): a "
        "state_dict file with torchvision's key names (fc.* ignored; DINO's module./backbone. prefixes "
        "stripped), a trainer run folder or its checkpoint.pt (its teacher backbone), or a torchvision "
        "weights name such as ResNet18_Weights.IMAGENET1K_V1 (from $TORCH_HOME/hub/checkpoints, downloaded "
        "there where the machine can), or `supervised` / `supervised:STEPS` (default 300): the project's own warm "
        "start, the backbone trained with labels on this run's training split (never the kNN queries), built "
        "once with progress and cached under $TRAINER_CACHE (default ~/.cache/dino-speed-tuner). torchvision's weights fit only resnet18/resnet50 at width 64 with the "
        "imagenet stem. `trainer export-backbone` writes the other direction.",
    )
    head: HeadConfig = Field(default_factory=HeadConfig)

    @field_validator("init")
    @classmethod
    def _builtin_init(cls, v: str | None) -> str | None:
        from trainer.pretrain import is_builtin, parse_steps

        if is_builtin(v):
            try:
                parse_steps(v)
            except ConfigError as exc:
                raise ValueError(str(exc).split(": ", 2)[-1]) from None
        return v


class LossConfig(_Strict):
    """DINO loss: cross-entropy between sharpened, centered teacher and student distributions."""

    student_temp: float = Field(0.1, gt=0.0, le=10.0, description="Student temperature (softmax of the student's outputs).")
    teacher_temp: float = Field(0.04, gt=0.0, le=10.0, description="Teacher temperature after warm-up.")
    warmup_teacher_temp: float = Field(0.04, gt=0.0, le=10.0, description="Teacher temperature at step 0.")
    warmup_teacher_temp_epochs: float = Field(0.0, ge=0.0, description="Linear warm-up length of the teacher temperature.")
    center_momentum: float = Field(0.9, ge=0.0, lt=1.0, description="EMA momentum of the center subtracted from the teacher's outputs.")
    pairing: Literal["standard", "globals_only", "global_to_local"] = Field(
        "standard",
        description="standard: every teacher global view against every other student view; "
        "globals_only: teacher globals against the other student globals only; "
        "global_to_local: teacher globals against the student's local views only.",
    )


class OptimConfig(_Strict):
    """AdamW and DINO's schedules (all cosine, precomputed per iteration)."""

    batch_size: int = Field(64, ge=1, le=65536, description="Images per optimizer micro-batch (per process).")
    accumulation_steps: int = Field(1, ge=1, le=256, description="Micro-batches per optimizer step.")
    lr: float = Field(5e-4, gt=0.0, le=10.0, description="Base learning rate for an effective batch of 256.")
    min_lr: float = Field(1e-6, ge=0.0, description="Learning rate at the end of the cosine schedule.")
    warmup_epochs: float = Field(1.0, ge=0.0, description="Linear lr warm-up.")
    weight_decay: float = Field(0.04, ge=0.0, description="Weight decay at the start (cosine to weight_decay_end; none on biases and norms).")
    weight_decay_end: float = Field(0.4, ge=0.0, description="Weight decay at the end of training.")
    momentum_teacher: float = Field(0.996, ge=0.0, le=1.0, description="Teacher EMA momentum at the start (cosine to 1).")
    clip_grad: float = Field(3.0, ge=0.0, description="Per-parameter gradient norm clip (0: off).")
    freeze_last_layer_epochs: float = Field(1.0, ge=0.0, description="Epochs during which the head's last layer is frozen.")
    fused: bool = Field(False, description="Fused AdamW kernel.")


class SystemConfig(_Strict):
    """Speed knobs that do not change the math (except precision)."""

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available, else the CPU.")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="fp16 uses a grad scaler.")
    tf32: bool = Field(False, description="Allow TF32 matmuls and convolutions on CUDA.")
    channels_last: bool = Field(False, description="channels_last memory format for the models and the crops.")
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = Field(
        "off", description="torch.compile mode of the backbone (training forwards only; evaluation stays eager).")
    compile_dynamic: bool | None = Field(
        None, description="torch.compile's `dynamic`: true traces shapes symbolically, false specializes on each shape, "
        "null lets torch decide (it turns dynamic after the second shape it sees).")
    compile_fallback: bool = Field(
        False, description="On a compile error, run the backbone eagerly (torch._dynamo's suppress_errors) instead of "
        "failing with reason 'compile'.")
    cudnn_benchmark: bool = Field(False, description="cuDNN picks convolution kernels by timing them (CUDA only).")
    grad_checkpointing: bool = Field(False, description="Recompute backbone activations in backward.")
    num_workers: int = Field(0, ge=0, le=256, description="DataLoader worker processes.")
    prefetch_factor: int | None = Field(None, ge=1, le=64, description="Batches prefetched per worker (needs workers).")
    pin_memory: bool = Field(False, description="Pinned host memory for batches (CUDA only).")
    persistent_workers: bool = Field(False, description="Keep DataLoader workers alive between epochs (needs workers).")
    host_allocator: Literal["system", "retain"] = Field(
        "retain", description="What the C allocator (glibc) does with large CPU blocks. retain: keep freed memory in "
        "the process for the next step (no mmap, no trimming), so a step reuses the pages the previous one freed; the "
        "process holds its peak memory while it runs. system: glibc as it comes: a block over its mmap threshold (at "
        "most 32 MiB) is mapped and unmapped on every use, so each step faults its large tensors' pages in afresh "
        "(on a 2-core AMD EPYC VM this cost the classic recipe 27% of its step). Per process: it does not change "
        "the arithmetic, and no effect where the C library is not glibc.")
    seed: int = Field(0, description="Seed of the initial weights, the data order and the augmentation.")

    @model_validator(mode="after")
    def _worker_options(self) -> "SystemConfig":
        if self.num_workers == 0 and (self.prefetch_factor is not None or self.persistent_workers):
            raise ValueError("prefetch_factor and persistent_workers need num_workers > 0")
        return self


class BudgetConfig(_Strict):
    """How long to train: epochs, or a fixed number of optimizer steps (which wins when set)."""

    epochs: int = Field(10, ge=1, le=100000, description="Passes over the training images.")
    steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs when set.")
    time_limit_s: float | None = Field(None, gt=0.0, description="Stop (and evaluate) after this much training time.")
    stop_at_step: int | None = Field(
        None, ge=1, description="End this run after this many optimizer steps, as a segment of the full budget: the "
        "learning-rate, weight-decay, teacher-momentum and temperature schedules still span `steps`/`epochs`, and "
        "`--resume` with a later stop continues it exactly (the tuner's promotion rungs). null: the full budget.")


class EvalConfig(_Strict):
    """Weighted kNN on the teacher's and the student's backbone features, as DINO's own evaluation.

    The teacher is an EMA that moves a few percent in a short trial; the student's kNN is reported
    beside it because it is the one that sees what a short trial did to the weights.
    """

    knn_k: int = Field(20, ge=1, le=1000, description="Neighbours that vote (DINO: 20).")
    knn_temperature: float = Field(0.07, gt=0.0, le=10.0, description="Vote weight exp(similarity / T) (DINO: 0.07).")
    every_epochs: int = Field(0, ge=0, description="Evaluate every N epochs during training (0: only at the end).")
    every_steps: int = Field(0, ge=0, description="Evaluate every N optimizer steps (0: off); for short trials.")
    at_start: bool = Field(True, description="Evaluate before training (knn_top1_initial).")
    batch_size: int = Field(256, ge=1, description="Feature-extraction batch size.")
    bn_stats: Literal["running", "precise"] = Field(
        "running",
        description="BatchNorm statistics the kNN features use. running: the running statistics training "
        "left (mean 0 / var 1 placeholders before training; afterwards an average over augmented, partly "
        "local-crop batches). precise: recomputed before each kNN, on a copy of the backbone, from the "
        "plain (eval-view) training images (`bn_images` of them), so the number reflects the weights, not "
        "the statistics; training is unaffected. Cost: one train-mode forward over `bn_images` images per "
        "backbone; on the default config (ResNet-18, 1,024 of 1,438 canvases, one thread, 2-core AMD EPYC) "
        "2.0-2.4 s per backbone on a quiet machine, so an evaluation of both backbones took 11.9-12.6 s "
        "instead of 7.5-7.9 s (+58%); 2.2-3.2 s per backbone (evaluations 13.9-21.5 s instead of "
        "8.6-14.1 s) while other jobs shared the CPU.",
    )
    bn_images: int = Field(1024, ge=16, description="precise bn_stats: training images the statistics are averaged over.")


class MeasureConfig(_Strict):
    """The speed phase: warm-up steps not counted, timed windows of steps, then profiled steps."""

    warmup_steps: int = Field(3, ge=0, le=10000, description="Steps run before timing starts (allocator, caches, compile).")
    window_steps: int = Field(5, ge=1, le=10000, description="Steps per timed window (synchronized only at its two ends).")
    windows: int = Field(3, ge=1, le=1000, description="Timed windows; throughput is their median.")
    profile_steps: int = Field(
        2, ge=0, le=1000, description="Steps after the windows whose time is broken down by phase (synchronized "
        "at every phase on a GPU, so never part of the throughput); 0: no breakdown.")
    epoch_start_steps: int = Field(
        2, ge=0, le=1000, description="With DataLoader workers: steps timed last, after the loader's iterator is made "
        "afresh as each epoch makes it (workers started again unless persistent); their time over the windows' step "
        "time is the epoch's start cost, which the throughput spreads over an epoch's steps. 0: not measured (the "
        "throughput is then the windows' median, which misses that cost).")


class TrainConfig(_Strict):
    """Everything that defines one training run.

    `TrainConfig()` keeps DINO's head sizes (65536 prototypes, hidden width 2048). The shipped
    `configs/default.yaml`, which `trainer train` runs without a CONFIG, shrinks the head and sets the
    warm-up, epochs and evaluation points for the embedded digits data on a CPU. `docs/config.md` lists
    every field with both values where they differ.
    """

    data: DataConfig = Field(default_factory=DataConfig)
    crops: CropsConfig = Field(default_factory=CropsConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    system: SystemConfig = Field(default_factory=SystemConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    measure: MeasureConfig = Field(default_factory=MeasureConfig)
    checkpoint_every_steps: int = Field(0, ge=0, description="Write a checkpoint every N steps (0: each epoch end).")

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.loss.pairing == "global_to_local" and self.crops.local_crops == 0:
            raise ValueError("loss.pairing 'global_to_local' needs crops.local_crops >= 1")
        if self.loss.pairing != "global_to_local" and self.crops.global_crops < 2 and self.crops.local_crops == 0:
            raise ValueError("one global crop and no local crops leave the loss no view pairs")
        if self.model.backbone.startswith("vit"):
            for name, size in (("global_size", self.crops.global_size), ("local_size", self.crops.local_size)):
                if size % self.model.patch_size:
                    raise ValueError(f"crops.{name}={size} is not a multiple of model.patch_size={self.model.patch_size}")
        return self

    # ---- YAML ----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, not tuples; strings, not paths) that YAML writes and reads back equal."""
        return self.model_dump(mode="json")

    def to_yaml(self, header: str | None = None) -> str:
        """The config as YAML, optionally after a comment header (each line prefixed with '# ')."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if header:
            text = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + text
        return text

    def save(self, path: str | Path, header: str | None = None) -> Path:
        """Write the config to `path` as YAML."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml(header))
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<config>") -> "TrainConfig":
        """Validate plain data; errors become a one-line `ConfigError` naming `source`."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, source)) from None

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> "TrainConfig":
        """Load YAML from `path` (a file, or a shipped config's name; None: the embedded default), then apply
        `key=value` overrides."""
        path = resolve_config_path(path)
        data = read_yaml_mapping(path)
        source = f"{path} (with --set {' '.join(overrides)})" if overrides else str(path)
        data = apply_overrides(data, overrides or [], source=source)
        return cls.from_dict(data, source=source)

    def with_overrides(self, overrides: dict[str, Any] | list[str], source: str = "<overrides>") -> "TrainConfig":
        """A copy with dotted-path overrides applied (a dict of values or a list of `k=v` strings)."""
        items = overrides if isinstance(overrides, list) else [(k, v) for k, v in overrides.items()]
        return TrainConfig.from_dict(apply_overrides(self.to_dict(), items, source=source), source=source)


def default_config_path() -> Path:
    """The embedded default config, `configs/default.yaml` (package data: `trainer/configs/` in a wheel)."""
    return packaged_config_path("default")


def _packaged_configs_dir() -> Path:
    # An installed wheel carries the files inside the package (pyproject maps configs/ to trainer.configs);
    # a source checkout or an editable install reads them where they are kept, at the repository root.
    here = Path(__file__).resolve().parent
    inside = here / "configs"
    return inside if inside.is_dir() else here.parent / "configs"


def packaged_config_names() -> list[str]:
    """Names of the configs shipped with the package (`trainer train NAME`)."""
    return sorted(p.stem for p in _packaged_configs_dir().glob("*.yaml"))


def packaged_config_path(name: str) -> Path:
    """The path of the shipped config `name` (e.g. "default")."""
    return _packaged_configs_dir() / f"{name}.yaml"


def resolve_config_path(ref: str | Path | None) -> Path:
    """`CONFIG` as a user gives it: a YAML path, or the name of a shipped config (`default`); None: the default.

    A path that exists wins over a name; a bare word that is neither is a one-line `ConfigError`.
    """
    if ref is None:
        return default_config_path()
    path = Path(ref)
    if path.exists() or path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        return path
    if str(ref) in packaged_config_names():
        return packaged_config_path(str(ref))
    raise ConfigError(f"{ref}: no such config file, and not a shipped config name "
                      f"(shipped: {', '.join(packaged_config_names())})")


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; every problem is a one-line ConfigError."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start} is 0x{exc.object[exc.start]:02x}); "
                          f"expected a YAML file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data, crops, model, ...), got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list, source: str = "<overrides>") -> dict[str, Any]:
    """Apply `a.b.c=value` strings (value parsed as YAML) or `(path, value)` pairs to nested data."""
    data = _deep_copy(data)
    for item in overrides:
        if isinstance(item, str):
            if "=" not in item:
                raise ConfigError(f"{source}: override {item!r} must look like section.field=value")
            key, raw = item.split("=", 1)
            try:
                value = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError:
                value = raw
        else:
            key, value = item
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: override {key!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line: the file, the first offending field's dotted path, and what is allowed."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        section = TrainConfig
        for part in err["loc"][:-1]:
            field = section.model_fields.get(str(part)) if isinstance(section, type) else None
            section = field.annotation if field is not None else None
        allowed = sorted(section.model_fields) if isinstance(section, type) and issubclass(section, BaseModel) else []
        hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
        return f"{source}: unknown field {loc!r}{hint}{close_keys_hint(str(err['loc'][-1]), allowed)}"
    msg = err["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
    if kind == "literal_error":
        msg = msg.replace("Input should be", "must be")
    extra = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
    more = f" [and {len(exc.errors()) - 1} more]" if len(exc.errors()) > 1 else ""
    return f"{source}: {loc}: {msg}{extra}{more}"


def close_keys_hint(key: str, allowed: list[str]) -> str:
    """"; did you mean X?" when `key` is close to some of `allowed` (a typo), else ""."""
    close = difflib.get_close_matches(key, allowed, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


# ---- a reference of the fields, generated from the models (`trainer config --help`, docs/config.md) ----


def field_reference(model: type[BaseModel], prefix: str = "") -> list[dict[str, Any]]:
    """Every leaf field of `model` with its dotted path, type, constraints, default and description.

    Nested sections are walked; a `dict[str, Model]` field (a search space's knobs) shows its key as
    `<name>`. Fields excluded from dumps (internal bookkeeping) are left out.
    """
    rows: list[dict[str, Any]] = []
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        path = f"{prefix}{name}"
        inner, keyed = _section_model(field.annotation)
        if inner is not None:
            if not field.is_required() and field.get_default(call_default_factory=True) is None:
                rows.append({"path": path, "type": "section or null", "default": None, "required": False,
                             "description": " ".join((field.description or "").split())})
            rows += field_reference(inner, f"{path}.<name>." if keyed else f"{path}.")
            continue
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        rows.append({"path": path, "type": _type_text(field), "default": default, "required": field.is_required(),
                     "description": " ".join((field.description or "").split())})
    return rows


def _section_model(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The config section inside an annotation: a model, Optional[model] or dict[str, model]."""
    from typing import Union, get_args, get_origin
    from types import UnionType

    origin, args = get_origin(annotation), get_args(annotation)
    if origin is dict and args and isinstance(args[1], type) and issubclass(args[1], BaseModel):
        return args[1], True
    if origin in (Union, UnionType):
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        return (models[0], False) if models else (None, False)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None, False


def _type_text(field: Any) -> str:
    """`int >= 1, <= 4`, `one of: fp32, bf16, fp16`, `float or null`, ... for a pydantic FieldInfo."""
    from typing import Literal, Union, get_args, get_origin
    from types import UnionType

    def name(tp: Any) -> str:
        origin, args = get_origin(tp), get_args(tp)
        if origin is Literal:
            return "one of: " + ", ".join(str(a) for a in args)
        if origin in (Union, UnionType):
            parts = [f"({p})" if "," in p else p for p in (name(a) for a in args if a is not type(None))]
            return " or ".join(parts) + (" or null" if type(None) in args else "")
        if origin in (tuple, list, dict):
            return f"{origin.__name__}[{', '.join(name(a) for a in args)}]"
        return getattr(tp, "__name__", str(tp))

    bounds = []
    for meta in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "length >="),
                           ("pattern", "matching")):
            value = getattr(meta, attr, None)
            if value is not None:
                bounds.append(f"{sign} {value}")
    return name(field.annotation) + (" " + ", ".join(bounds) if bounds else "")
