"""`SearchSpace`: one YAML file that describes a whole study.

A space names a base `TrainConfig`, the configuration the user runs today (the baseline), the knobs to
search by their `TrainConfig` paths, the objectives and constraints, what one trial measures, the
study budget, the sampler, the pruners per phase, the storage and the Ray settings.

Every mistake a user can make in the file is raised as a `ConfigError` whose message is one line:
``FILE: field.path: what is allowed``. Loading validates everything (the base config, the baseline,
every knob's path and values, the sampler and pruner names and arguments) before anything touches a
study database, so a malformed space never changes an existing study.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import operator
import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import optuna
import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from trainer.config import ConfigError, TrainConfig, close_keys_hint, field_reference, read_yaml_mapping
from trainer.knobs import knob_class

#: Params under this prefix set an environment variable of the trial process instead of a config field
#: (e.g. ``env.TRAINER_INJECT_FAULT`` for fault-injection tests, or allocator settings).
ENV_PREFIX = "env."

#: TrainConfig fields holding a file or folder; relative values are made absolute when the space is loaded.
PATH_FIELDS = ("model.init", "data.root")

#: The configuration most DINO users run today (the official recipe's multi-crop and head settings).
CLASSIC_BASELINE: dict[str, Any] = {
    "crops.global_crops": 2,
    "crops.local_crops": 8,
    "model.head.out_dim": 65536,
    "model.head.hidden_dim": 2048,
    "system.precision": "fp32",
    "optim.batch_size": 64,
    "system.num_workers": 4,
}

_OPS = {"==": operator.eq, "!=": operator.ne, ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
_CONDITION = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(==|!=|>=|<=|>|<|in)\s*(.+?)\s*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Condition(_Strict):
    """``PATH OP VALUE`` (``system.num_workers > 0``, ``system.precision in [fp16, bf16]``)."""

    path: str
    op: str
    value: Any

    @classmethod
    def parse(cls, text: str) -> "Condition":
        """Parse one condition string; the value is read as YAML."""
        match = _CONDITION.match(str(text))
        if not match:
            raise ValueError(f"condition {text!r} must look like 'section.field OP value' with OP one of "
                             f"{', '.join(list(_OPS) + ['in'])}")
        path, op, raw = match.groups()
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ValueError(f"condition {text!r} must look like 'section.field OP value' with a plain value") from None
        return cls(path=path, op=op, value=value)

    def holds(self, actual: Any) -> bool:
        """Whether the condition is true for the knob's actual value."""
        if self.op == "in":
            return actual in (self.value if isinstance(self.value, list) else [self.value])
        try:
            return bool(_OPS[self.op](actual, self.value))
        except TypeError:
            return False

    def __str__(self) -> str:
        return f"{self.path} {self.op} {self.value}"


class Param(_Strict):
    """One knob: categorical `choices`, or an int/float range `low`..`high` with optional `step`/`log`.

    `when` lists conditions (all must hold) on knobs listed earlier or on the base config; a knob whose
    condition fails is not sampled and keeps the base config's value.
    """

    choices: list[Any] | None = Field(None, min_length=1, description="Categorical values.")
    low: float | None = Field(None, description="Range start (inclusive).")
    high: float | None = Field(None, description="Range end (inclusive).")
    step: float | None = Field(None, gt=0, description="Range step (int ranges default to 1).")
    log: bool = Field(False, description="Sample the range on a log scale.")
    type: Literal["int", "float"] | None = Field(None, description="Range type (default: int when low, high and step are whole).")
    when: list[str] = Field(default_factory=list, description="Conditions, e.g. 'system.num_workers > 0'.")

    @field_validator("when", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _kind(self) -> "Param":
        ranged = self.low is not None or self.high is not None
        if self.choices is not None and ranged:
            raise ValueError("give either choices or low/high, not both")
        if self.choices is not None and any(not isinstance(c, (str, int, float, bool, type(None))) for c in self.choices):
            raise ValueError("choices must be single values (numbers, strings, booleans or null)")
        if self.choices is None and not (self.low is not None and self.high is not None):
            raise ValueError("give choices: [...] or both low and high")
        if ranged:
            if self.low > self.high:
                raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
            if self.log and (self.low <= 0 or self.step is not None):
                raise ValueError("log ranges need low > 0 and no step")
        for text in self.when:
            Condition.parse(text)
        return self

    @property
    def is_int(self) -> bool:
        if self.type is not None:
            return self.type == "int"
        return all(v is None or float(v).is_integer() for v in (self.low, self.high, self.step))

    def distribution(self) -> optuna.distributions.BaseDistribution:
        """The Optuna distribution this knob is sampled from."""
        if self.choices is not None:
            return optuna.distributions.CategoricalDistribution(self.choices)
        if self.is_int:
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log,
                                                        step=int(self.step or 1))
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def conditions(self) -> list[Condition]:
        return [Condition.parse(t) for t in self.when]


class Objectives(_Strict):
    """The study's two objectives, both maximized: images per second and kNN top-1 (points)."""

    throughput_img_s: Literal["max"] = "max"
    knn_top1: Literal["max"] = "max"


class Constraints(_Strict):
    """Feasibility, told to Optuna as constraints so the sampler learns from infeasible trials."""

    knn_tolerance_points: float = Field(
        1.0, ge=0.0, description="A trial is feasible when its kNN >= baseline kNN - tolerance (never below the measured noise).")
    knn_noise_seeds: int = Field(2, ge=1, le=10, description="Seeds at which the baseline's quality phase is run to measure kNN noise.")
    peak_memory_mb: float | None = Field(None, gt=0, description="Optional limit on peak memory (device memory on a GPU, RSS on a CPU).")
    knn_backbone: Literal["teacher", "student"] = Field(
        "teacher",
        description="Whose kNN top-1 is the study's kNN objective, the constraint's and the quality pruner's "
        "value: teacher (DINO's own evaluation; an EMA with momentum 0.996 moves about 2% in 40 steps, so "
        "in a short trial it barely sees what the steps did) or student (moves within a short trial). "
        "Both are stored on every trial either way.")
    knn_control: dict[str, Any] | None = Field(
        None,
        description="A positive control: TrainConfig overrides that make the baseline learn worse (e.g. "
        "{optim.lr: 0.01}, twenty times the default). The control runs as one extra trial at the baseline's seed "
        "(and through every rung); the kNN check has power, at a budget, only where the control's kNN falls below "
        "the baseline's by more than the tolerance. Without it, power is judged by whether the baseline's kNN "
        "moves beyond its seeds' spread, which can mislead (docs/quality.md). The control never wins and "
        "counts towards budget.n_trials.")

    @property
    def knn_metric(self) -> str:
        """The trial result key the kNN objective, constraint and quality pruner read."""
        return "knn_top1" if self.knn_backbone == "teacher" else "student_knn_top1"


class TrialBudget(_Strict):
    """What one trial measures: warm-up, timed windows (speed phase), then training to `steps` (quality)."""

    warmup_steps: int = Field(2, ge=0, description="Steps not timed (allocator, caches, compile).")
    window_steps: int = Field(3, ge=1, description="Steps per timed window.")
    windows: int = Field(3, ge=1, description="Timed windows; throughput is their median.")
    profile_steps: int = Field(1, ge=0, description="Steps after the windows timed phase by phase (not part of the throughput).")
    epoch_start_steps: int = Field(2, ge=0, description="With DataLoader workers: steps timed last, after the loader "
                                   "starts afresh as each epoch does; the throughput includes that cost, spread over "
                                   "an epoch (trainer's measure.epoch_start_steps). 0: not measured.")
    steps: int = Field(60, ge=1, description="Optimizer steps per trial (the quality budget).")
    eval_every_steps: int = Field(20, ge=0, description="kNN every N steps after the speed phase (0: only at the end).")
    timeout_s: float = Field(600.0, gt=0, description="A trial running longer than this is stopped and recorded as "
                             "'timeout' (the baseline's limit, and every trial's least limit).")
    timeout_factor: float | None = Field(
        4.0, gt=0, description="Once the baseline has run, a trial may take this many times the baseline's trial "
        "time (never less than timeout_s): limits scale with the machine, so a slow one still finishes its trials. "
        "null: timeout_s only.")
    rungs: list[int] = Field(
        default_factory=list, description="Promotion rungs: total optimizer steps, increasing, each above `steps`. "
        "After the search the baseline's seeds and the Pareto candidates continue from their checkpoints to each "
        "rung, and a candidate whose kNN falls below the baseline's at that rung by more than the tolerance is "
        "PRUNED there. Trials then train on schedules that span the last rung and stop at `steps`. []: no rungs.")
    rung_reduction: float = Field(2.0, gt=1.0, description="Successive halving: of the candidates within tolerance "
                                  "at a rung, the fastest 1/rung_reduction (at least one) go on to the next.")
    rung_candidates: int | None = Field(None, ge=1, description="At most this many Pareto candidates (the fastest) "
                                        "enter the first rung; null: all.")

    @property
    def speed_steps(self) -> int:
        return self.warmup_steps + self.windows * self.window_steps + self.profile_steps + self.epoch_start_steps

    @model_validator(mode="after")
    def _speed_fits(self) -> "TrialBudget":
        if self.speed_steps > self.steps:
            raise ValueError(f"warmup_steps + windows * window_steps + profile_steps + epoch_start_steps = {self.speed_steps} "
                             f"must be <= steps ({self.steps})")
        previous = self.steps
        for rung in self.rungs:
            if rung <= previous:
                raise ValueError(f"rungs {self.rungs}: each rung must be above steps ({self.steps}) and the rung "
                                 "before it")
            previous = rung
        return self

    def overrides(self) -> dict[str, Any]:
        """The config fields a trial replaces (the full-training budget stays in the exported config)."""
        out = {"measure.warmup_steps": self.warmup_steps, "measure.window_steps": self.window_steps,
               "measure.windows": self.windows, "measure.profile_steps": self.profile_steps,
               "measure.epoch_start_steps": self.epoch_start_steps, "budget.steps": self.steps,
               "budget.time_limit_s": None, "eval.every_steps": self.eval_every_steps, "eval.every_epochs": 0,
               "eval.at_start": True, "checkpoint_every_steps": 0}
        if self.rungs:  # schedules over the last rung; the trial is its first segment, its checkpoint kept
            out.update({"budget.steps": self.rungs[-1], "budget.stop_at_step": self.steps,
                        "checkpoint_every_steps": self.rungs[-1]})
        return out


class StudyBudget(_Strict):
    """When the study stops: after `n_trials` trials in all (baseline included) and/or `timeout_s`."""

    n_trials: int | None = Field(20, ge=1, description="Trials in the study, counting the baseline trials.")
    timeout_s: float | None = Field(None, gt=0, description="Wall-clock limit of one `tuner run`.")

    @model_validator(mode="after")
    def _some_limit(self) -> "StudyBudget":
        if self.n_trials is None and self.timeout_s is None:
            raise ValueError("set n_trials, timeout_s or both")
        return self


SAMPLERS = {"tpe": "TPESampler", "nsga2": "NSGAIISampler", "random": "RandomSampler", "grid": "GridSampler",
            "gp": "GPSampler", "qmc": "QMCSampler", "bruteforce": "BruteForceSampler"}
# Not here: CmaEsSampler, which refuses a study of two objectives (the tuner's: throughput and kNN) and
# samples no categorical knob itself.


class SamplerSpec(_Strict):
    """Optuna sampler, with a seed and the sampler's own arguments (`args`, passed through): tpe, nsga2,
    random, grid, gp (Gaussian-process BO), qmc (a quasi-Monte Carlo sequence, the same at every seed unless
    `args: {scramble: true}`) or bruteforce (every configuration once, in a random order, like a shuffled grid)."""

    name: Literal["tpe", "nsga2", "random", "grid", "gp", "qmc", "bruteforce"] = "tpe"
    seed: int | None = 0
    args: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments of the Optuna sampler.")
    objective: Literal["throughput", "pareto"] = Field(
        "throughput",
        description="What the sampler models: pareto (throughput and kNN, both stored objectives: it spreads "
        "trials along their trade-off) or throughput (throughput alone, with the kNN tolerance as the constraint "
        "it learns from: every trial aims at the study's pick, the fastest feasible configuration). Either way "
        "both objectives are stored and reported.")


class PrunerSpec(_Strict):
    """An Optuna pruner by class name (MedianPruner, PercentilePruner, ThresholdPruner, ...) and arguments."""

    name: str = "MedianPruner"
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        allowed = [n for n in dir(optuna.pruners) if n.endswith("Pruner") and n not in ("BasePruner", "PatientPruner")]
        if v not in allowed:
            raise ValueError(f"unknown pruner {v!r}; allowed: {', '.join(allowed)} (or none)")
        return v

    @model_validator(mode="after")
    def _args_bind(self) -> "PrunerSpec":
        try:
            inspect.signature(getattr(optuna.pruners, self.name)).bind(**self.args)
        except TypeError as exc:
            raise ValueError(f"{self.name} arguments: {exc}") from None
        return self

    def build(self) -> optuna.pruners.BasePruner:
        """The Optuna pruner object."""
        return getattr(optuna.pruners, self.name)(**self.args)


class PrunerPerPhase(_Strict):
    """The pruner judging each phase: `speed` on throughput, `quality` on kNN (none: never prune)."""

    speed: PrunerSpec | None = None
    quality: PrunerSpec | None = None

    @field_validator("speed", "quality", mode="before")
    @classmethod
    def _none_word(cls, v: Any) -> Any:
        if isinstance(v, str):
            return None if v.lower() in ("none", "off") else {"name": v}
        return v


class RaySettings(_Strict):
    """Where trials run: a local Ray (address null) or an existing cluster, and the resources per trial."""

    address: str | None = Field(None, description="Existing Ray cluster (e.g. 'auto' or 'ray://host:10001'); null starts one.")
    resources_per_trial: dict[str, float] | None = Field(
        None, description="e.g. {cpu: 8, gpu: 1}; default: one GPU each, or all CPUs of a node when there is no GPU.")
    max_concurrent_trials: int | None = Field(None, ge=1, description="Default: one per GPU, or 1 without GPUs.")
    workers_per_trial: int = Field(
        1, ge=1, description="Processes per trial: each trial runs as a DDP job of this many ranks on its node (gloo "
        "on CPU, NCCL on GPUs: give it as many GPUs in resources_per_trial); the throughput counts every rank's images.")
    storage_path: str | None = Field(
        None, description="Where Ray Tune keeps its trial folders: a folder every node can reach (an NFS mount) or a "
        "cloud URI (s3://..., gs://...) on a cluster of several machines; default: studies/<name>/ on the driver.")
    torch_threads: int | None = Field(
        None, ge=1, description="torch threads in a trial (default: the trial's CPUs; fewer helps when other "
        "processes share the CPU, where spinning OpenMP threads slow a step down many times).")
    reuse_actors: bool = Field(
        False, description="Run trials one after another in the same Ray actor (process), saving each trial the "
        "actor's start and the imports of torch and the trainer (seconds a trial). Each trial still builds its own "
        "data, models and compiled code, and sets its own environment variables and peak-memory counter; what a "
        "process keeps (the allocator's state, loaded modules) carries over.")


class SearchSpace(_Strict):
    """A whole study, from one YAML file."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Study name (also its folder under studies/).")
    base: dict[str, Any] = Field(default_factory=dict, description="{config: FILE (default: the embedded default), overrides: {path: value}}.")
    baseline: dict[str, Any] = Field(default_factory=lambda: dict(CLASSIC_BASELINE),
                                     description="Overrides (on base) describing today's configuration.")
    params: dict[str, Param] = Field(min_length=1, description="Knobs by TrainConfig path.")
    objectives: Objectives = Field(default_factory=Objectives)
    constraints: Constraints = Field(default_factory=Constraints)
    trial: TrialBudget = Field(default_factory=TrialBudget)
    budget: StudyBudget = Field(default_factory=StudyBudget)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    pruner: PrunerPerPhase = Field(default_factory=PrunerPerPhase)
    storage: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///studies/<name>.db.")
    ray: RaySettings = Field(default_factory=RaySettings)

    source: str = Field("<space>", exclude=True, description="File the space came from (for messages).")

    @field_validator("base")
    @classmethod
    def _base_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = set(v) - {"config", "overrides"}
        if unknown:
            raise ValueError(f"unknown key {sorted(unknown)[0]!r}; allowed: config, overrides")
        if not isinstance(v.get("overrides", {}) or {}, dict):
            raise ValueError("overrides must be a mapping of TrainConfig paths to values")
        return v

    # ---- loading ---------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> "SearchSpace":
        """Read and fully validate a space file (a path, or a shipped space's name); every problem is a
        one-line `ConfigError`."""
        from tuner.shipped import resolve_space_path

        path = resolve_space_path(path)
        data = read_yaml_mapping(path)
        return cls.from_dict(data, source=str(path), root=path.parent)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<space>", root: Path | None = None) -> "SearchSpace":
        """Validate plain data (as read from YAML); `root` resolves a relative base config path."""
        try:
            space = cls.model_validate({**data, "source": source})
        except ValidationError as exc:
            raise ConfigError(_one_line(exc, source)) from None
        config = space.base.get("config")
        if config is not None and root is not None and not Path(config).is_absolute() and not Path(config).exists():
            space.base["config"] = str((root / config).resolve())
        overrides = space.base.get("overrides") or {}
        for key in PATH_FIELDS:  # trials run in Ray's own folders: a relative path must not depend on it
            value = overrides.get(key)
            if isinstance(value, str) and "://" not in value and not Path(value).is_absolute():
                here = Path(value)
                near_space = (root / value) if root is not None else here
                if here.exists() or near_space.exists():
                    overrides[key] = str((here if here.exists() else near_space).resolve())
        space.check()
        return space

    # ---- checks against TrainConfig ---------------------------------------------------------------

    def check(self) -> None:
        """Validate knob paths and values, the base config and the baseline against `TrainConfig`."""
        src = self.source
        base = self.base_config()
        for name, param in self.params.items():
            if name.startswith(ENV_PREFIX):
                continue
            field = _field_at(name)
            if field is None:
                paths = [r["path"] for r in field_reference(TrainConfig)]
                raise ConfigError(f"{src}: params.{name}: not a TrainConfig field (e.g. crops.local_crops, "
                                  f"model.head.out_dim, optim.batch_size, system.num_workers){close_keys_hint(name, paths)}")
            try:
                knob_class(name, base.to_dict())  # every knob has a declared class, so it gets a quality verdict
            except ConfigError as exc:
                raise ConfigError(f"{src}: params.{name}: {exc}") from None
            values = param.choices if param.choices is not None else [param.low, param.high]
            if param.choices is None and param.is_int:
                values = [int(v) for v in values]
            adapter = TypeAdapter(Annotated[field.annotation, field])
            for value in values:
                try:
                    adapter.validate_python(value)
                except ValidationError as exc:
                    raise ConfigError(f"{src}: params.{name}: value {value!r} is not allowed: "
                                      f"{exc.errors()[0]['msg']}") from None
        known = list(self.params)
        for i, (name, param) in enumerate(self.params.items()):
            for cond in param.conditions():
                if cond.path not in known[:i] and _field_at(cond.path) is None:
                    raise ConfigError(f"{src}: params.{name}.when: {cond.path!r} is neither a knob listed "
                                      f"before {name} nor a TrainConfig field")
        try:
            TrainConfig.from_dict(_apply(base.to_dict(), self.baseline), source=f"{src}: baseline")
        except ConfigError as exc:
            raise ConfigError(str(exc)) from None
        control = self.constraints.knn_control
        if control is not None:
            if not control:
                raise ConfigError(f"{src}: constraints.knn_control: empty; give the change that harms learning "
                                  "(e.g. {optim.lr: 0.01}) or leave the field out")
            for name in control:
                if _field_at(name) is None:
                    paths = [r["path"] for r in field_reference(TrainConfig)]
                    raise ConfigError(f"{src}: constraints.knn_control.{name}: not a TrainConfig field"
                                      f"{close_keys_hint(name, paths)}")
            try:
                TrainConfig.from_dict(_apply(_apply(base.to_dict(), self.baseline), control),
                                      source=f"{src}: constraints.knn_control")
            except ConfigError as exc:
                raise ConfigError(str(exc)) from None
        if self.ray.workers_per_trial > 1 and self.trial.rungs:
            raise ConfigError(f"{src}: ray.workers_per_trial {self.ray.workers_per_trial}: promotion rungs (trial.rungs) "
                              "continue a trial in one process, which would change its math; use one or the other")
        if self.sampler.name in ("grid", "bruteforce"):
            for name, param in self.params.items():
                if param.choices is None and not param.is_int:
                    raise ConfigError(f"{src}: params.{name}: the {self.sampler.name} sampler needs choices or an int range")
        try:
            self.build_sampler()
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{src}: sampler.args: {exc}") from None

    def base_config(self) -> TrainConfig:
        """The base `TrainConfig` (file plus overrides) every trial starts from."""
        overrides = self.base.get("overrides") or {}
        config = self.base.get("config")
        try:
            base = TrainConfig.load(config) if config else TrainConfig.load()
            return base.with_overrides(dict(overrides), source=f"{self.source}: base.overrides")
        except ConfigError as exc:
            raise ConfigError(str(exc) if str(exc).startswith(self.source) else f"{self.source}: base: {exc}") from None

    # ---- derived objects --------------------------------------------------------------------------

    def storage_url(self) -> str:
        """The study database URL (default: sqlite:///studies/<name>.db, relative to the working folder)."""
        return self.storage or f"sqlite:///studies/{self.name}.db"

    def build_sampler(self) -> optuna.samplers.BaseSampler:
        """The configured Optuna sampler."""
        special = {"grid": _AskTellGridSampler, "bruteforce": _AskTellBruteForceSampler}
        cls = special.get(self.sampler.name) or getattr(optuna.samplers, SAMPLERS[self.sampler.name])
        args = self.sampler_args()
        if self.sampler.name == "grid":
            args.setdefault("search_space", {n: _grid_values(p) for n, p in self.params.items()})
        sampler = cls(seed=self.sampler.seed, **args)
        return _ThroughputSampler(sampler) if self.sampler.objective == "throughput" else sampler

    def sampler_args(self) -> dict[str, Any]:
        """The sampler's keyword arguments: the tuner's defaults (tpe: multivariate, with a constant liar for
        parallel trials on several GPUs; gp: no warning for knobs drawn at random), then the space's
        `sampler.args` over them."""
        defaults = {"tpe": {"multivariate": True, "constant_liar": True},
                    # GP models the knobs every trial has (the baseline's trials carry every knob whose base
                    # value is a choice); the others (conditional ones whose condition fails somewhere) are
                    # drawn at random, as designed, not worth a warning per knob per trial
                    "gp": {"warn_independent_sampling": False}}.get(self.sampler.name, {})
        return {**defaults, **self.sampler.args}

    def sections(self) -> dict[str, Any]:
        """The sections that define what a trial measures, as plain data (stored with the study)."""
        return json.loads(json.dumps({
            "params": {n: p.model_dump() for n, p in self.params.items()},
            "base": self.base_config().to_dict(),
            "baseline": self.baseline,
            "trial": self.trial.model_dump(),
            "knn_backbone": self.constraints.knn_backbone,  # what the stored kNN objective values mean
            **({"knn_control": self.constraints.knn_control} if self.constraints.knn_control else {}),
        }, sort_keys=True, default=str))

    def fingerprint(self) -> dict[str, str]:
        """Hashes of `sections()`; a study refuses a space that changed them."""
        return {k: hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()[:16]
                for k, v in self.sections().items()}


def first_difference(old: Any, new: Any, path: str = "") -> str | None:
    """The dotted path of the first value that differs between two plain-data trees, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            found = first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
            if found:
                return found
        return None
    return None if old == new else f"{path} ({old!r} -> {new!r})"


class _AskTellGridSampler(optuna.samplers.GridSampler):
    """GridSampler for ask/tell with enqueued trials.

    Optuna's GridSampler expects a grid id on every trial it is told about (enqueued baseline trials have
    none) and calls `Study.stop()` when the grid is used up, which only works inside `optimize`. Here the
    searcher ends the study when `is_exhausted` says so.
    """

    def after_trial(self, study, trial, state, values) -> None:
        return None  # GridSampler's own after_trial only stops an `optimize` loop


class _AskTellBruteForceSampler(optuna.samplers.BruteForceSampler):
    """BruteForceSampler for ask/tell: each configuration once, in a random order.

    Optuna's calls `Study.stop()` once every configuration has been tried, which only works inside
    `optimize`; here that marks the sampler exhausted, and the searcher ends the study (as with the grid).
    """

    exhausted = False

    def after_trial(self, study, trial, state, values) -> None:
        super().after_trial(_StopMarks(study, self), trial, state, values)

    def is_exhausted(self, study) -> bool:
        return self.exhausted


class _StopMarks:
    """The study as BruteForceSampler.after_trial sees it: `stop()` marks the sampler exhausted."""

    def __init__(self, study, sampler: _AskTellBruteForceSampler):
        self._study, self._sampler = study, sampler

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def stop(self) -> None:
        self._sampler.exhausted = True


class _ThroughputSampler(optuna.samplers.BaseSampler):
    """A sampler that sees the study as throughput alone (`sampler.objective: throughput`).

    The study keeps both objectives (throughput, kNN) for the report and the front; the sampler is shown
    each trial's first value only, and the kNN tolerance still reaches it as the trial's constraint, so a
    model-based sampler spends its trials on the question the study answers: the fastest feasible
    configuration, rather than on the whole trade-off."""

    def __init__(self, inner: optuna.samplers.BaseSampler):
        self.inner = inner

    def __getattr__(self, name: str) -> Any:  # is_exhausted and the like: the inner sampler's
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def infer_relative_search_space(self, study, trial):
        return self.inner.infer_relative_search_space(_ThroughputView(study), trial)

    def sample_relative(self, study, trial, search_space):
        return self.inner.sample_relative(_ThroughputView(study), trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.inner.sample_independent(_ThroughputView(study), trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self.inner.before_trial(_ThroughputView(study), trial)

    def after_trial(self, study, trial, state, values) -> None:
        self.inner.after_trial(_ThroughputView(study), _throughput_only(trial), state,
                                list(values[:1]) if values is not None else None)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


class _ThroughputView:
    """The study as `_ThroughputSampler`'s inner sampler sees it: one objective, throughput."""

    def __init__(self, study: optuna.Study):
        self._study = study

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    @property
    def directions(self) -> list:
        return self._study.directions[:1]

    @property
    def direction(self):
        return self._study.directions[0]

    def _is_multi_objective(self) -> bool:
        return False

    def _get_trials(self, *args, **kwargs) -> list:
        return _throughput_only_all(self._study._get_trials(*args, **kwargs))

    def get_trials(self, *args, **kwargs) -> list:
        return _throughput_only_all(self._study.get_trials(*args, **kwargs))

    @property
    def trials(self) -> list:
        return self.get_trials()


def _throughput_only_all(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The trials as the one-objective sampler sees them. A trial that failed as infeasible (out of memory, a
    non-finite loss: stored at 0 img/s) is shown at the slowest throughput a trial measured, not at 0: it is
    as bad as the worst configuration that trained, and a 0 among measured values would make a
    Gaussian-process model write off the whole neighbourhood of a knob value (its constraint still marks
    it infeasible)."""
    measured = [t.values[0] for t in trials if t.values is not None and not t.user_attrs.get("fail_reason")]
    worst = min(measured) if measured else None
    return [_throughput_only(t, worst if t.user_attrs.get("fail_reason") else None) for t in trials]


def _throughput_only(trial: optuna.trial.FrozenTrial, instead: float | None = None) -> optuna.trial.FrozenTrial:
    """The trial with its first value (throughput) only, or `instead` of it; the stored trial is not touched."""
    if trial.values is None or len(trial.values) < 2:
        return trial
    view = copy.copy(trial)
    view.values = [instead if instead is not None else trial.values[0]]
    return view


def _apply(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    from trainer.config import apply_overrides

    return apply_overrides(data, list(overrides.items()))


def _grid_values(param: Param) -> list[Any]:
    if param.choices is not None:
        return list(param.choices)
    step = int(param.step or 1)
    return list(range(int(param.low), int(param.high) + 1, step))


def _field_at(path: str):
    """The pydantic FieldInfo of a dotted `TrainConfig` path, or None."""
    model: Any = TrainConfig
    field = None
    for part in path.split("."):
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        field = model.model_fields[part]
        model = field.annotation
    return field


def _model_of(annotation: Any) -> tuple[Any, bool]:
    """The pydantic model inside an annotation (Optional[M], dict[str, M]) and whether a dict key comes first."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is dict:
        return _model_of(args[1])[0], True
    if origin in (Union, UnionType):
        return next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None), False
    return (annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None), False


def _one_line(exc: ValidationError, source: str) -> str:
    """One line for the first error: file, dotted field path, what is allowed."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        model: Any = SearchSpace
        parts = [str(p) for p in err["loc"][:-1]]
        while parts and model is not None:
            field = model.model_fields.get(parts.pop(0))
            model, skip_key = _model_of(field.annotation) if field is not None else (None, False)
            if skip_key and parts:
                parts.pop(0)  # a dict key (a knob path), not a field
        allowed = [n for n in getattr(model, "model_fields", {}) if n != "source"]
        hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
        return f"{source}: unknown field {loc!r}{hint}{close_keys_hint(str(err['loc'][-1]), allowed)}"
    if err["type"] == "missing":
        return f"{source}: {loc}: required field is missing"
    msg = err["msg"].replace("Value error, ", "").replace("Input should be", "must be")
    got = err.get("input")
    extra = f" (got {got!r})" if got is not None and not isinstance(got, (dict, list)) else ""
    more = f" [and {len(exc.errors()) - 1} more]" if len(exc.errors()) > 1 else ""
    return f"{source}: {loc}: {msg}{extra}{more}"
