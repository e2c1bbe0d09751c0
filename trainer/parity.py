"""Parity: does a speed knob keep the training math? Run both configs a few steps and compare.

A knob such as channels_last, DataLoader workers, fused AdamW or torch.compile must not change what
training computes. That can be checked exactly, with no learning signal at all: from the same seed,
the same data order, the same augmentation draws and the same initial weights, run N optimizer steps
of config A and of config B and compare, step by step, the loss, the global gradient norm and every
parameter's gradient norm, and after N steps the student's weights (relative to how far training
moved them), its BatchNorm running statistics and its outputs on a fixed batch.

Why per-parameter gradient norms: AdamW divides each update by the gradient's running RMS, so a bug
that scales one layer's gradient by a constant leaves the weights almost untouched and the global norm
nearly so; the per-parameter norms show it at once.

What "the same" may differ by is measured, not assumed:

- `exact` knobs are held to float round-off. The bound is measured per run: A again, with the images
  of every batch in another order (the same sums, added in another order), shows how far these N
  steps amplify round-off; AdamW's first steps move each weight by about +-lr whatever the size of
  its gradient, so round-off in a near-zero gradient element grows quickly. The tolerance is
  `EXACT_FACTOR` times that reference at every step, never below `EXACT_FLOOR`.
- `approximate` knobs (bf16, fp16, TF32) are held to a band measured from A's fp32 trajectory against
  the reduced-precision one at `seeds` other seeds (the worst of every step and seed), times `BAND_MARGIN`.
- `method` knobs are refused: they change what is learned, so parity cannot judge them.

Data order and augmentation are already functions of (seed, epoch, step) in the trainer, whatever the
number of DataLoader workers; B starts from A's initial weights, and both run with PyTorch's
deterministic algorithms on, so any difference left is the knob's.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from trainer.config import ConfigError, TrainConfig
from trainer.knobs import APPROXIMATE, EXACT, NOT_KNOBS, differences, knob_class, knob_note

#: What is compared, in the order a report lists them.
QUANTITIES = ("loss", "grad_norm", "param_grad_norms", "weights", "buffers", "outputs")
#: Optimizer steps per check: enough for AdamW to have moved every weight, few enough to stay cheap.
DEFAULT_STEPS = 4
#: An exact knob may differ from A by this many times the measured round-off reference (per step)...
EXACT_FACTOR = 100.0
#: ...and never needs to be closer than this (relative).
EXACT_FLOOR = 1e-5
#: An approximate knob's band is the worst of its seeds and steps times this.
BAND_MARGIN = 2.0
#: Differences in these fields do not touch the N steps' math (they say how a run is measured or evaluated).
IGNORED_PREFIXES = ("measure.", "eval.", "checkpoint_every_steps", "budget.time_limit_s")


class ParityError(ConfigError):
    """Parity cannot be judged for this pair (a method knob differs, or the run cannot be deterministic)."""


@dataclass
class Trajectory:
    """N steps of one config: per-step loss and gradient norms, and the student after the last step."""

    losses: list[float]
    param_grad_norms: torch.Tensor  # [steps, parameters], before clipping
    param_names: list[str]
    start: dict[str, torch.Tensor]  # student parameters before the first step
    weights: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    outputs: torch.Tensor  # student (backbone + head, eval mode) on a fixed batch of plain training images
    seconds: float

    @property
    def skipped(self) -> torch.Tensor:
        """Steps whose gradients were not finite: fp16's grad scaler skips them by design (without a scaler
        the trainer stops at such a step instead)."""
        return ~torch.isfinite(self.param_grad_norms).all(dim=1)

    @property
    def grad_norms(self) -> torch.Tensor:
        """The global gradient norm per step."""
        return self.param_grad_norms.double().pow(2).sum(dim=1).sqrt()


@dataclass
class ParityResult:
    """The verdict of one parity check: per quantity the worst difference against its tolerance."""

    verdict: str  # "ok" or "failed"
    knobs: dict[str, list[Any]]  # path -> [value in A, value in B, class]
    steps: int
    worst: dict[str, dict[str, Any]]  # quantity -> {diff, tolerance, ratio, where} at its worst step
    tolerance_source: str
    reference: dict[str, list[float]]  # A's round-off reference, per quantity (per step where it has steps)
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"

    @property
    def max_diff(self) -> float:
        return max((w["diff"] for w in self.worst.values()), default=0.0)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-safe data (non-finite numbers as strings) for files and study attributes."""
        return _json_safe(asdict(self))

    def line(self) -> str:
        """`parity ok (max rel. diff 3e-07, 0.05 of tolerance)` or `parity FAILED: param_grad_norms 1.0e-02 > 2.0e-04 (step 0, ...)`."""
        if self.ok:
            margin = max((_sortable(w["ratio"]) for w in self.worst.values()), default=0.0)
            return f"parity ok (max rel. diff {self.max_diff:.0e}, {margin:.2f} of tolerance)"
        q = max(self.failed, key=lambda k: _sortable(self.worst[k]["ratio"]))
        w = self.worst[q]
        return f"parity FAILED: {q} {w['diff']:.1e} > {w['tolerance']:.1e} ({w['where']})"


def _sortable(x: float) -> float:
    return math.inf if math.isnan(x) else x


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# ---- running N steps ---------------------------------------------------------------------------


@contextlib.contextmanager
def deterministic(device: torch.device):
    """PyTorch's deterministic algorithms for the duration; an op without one is a `ParityError`."""
    before = torch.are_deterministic_algorithms_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    except RuntimeError as exc:
        if "deterministic" in str(exc).lower():
            first = str(exc).strip().splitlines()[0]
            raise ParityError(f"cannot be made deterministic on {device.type}: {first}") from None
        raise
    finally:
        torch.use_deterministic_algorithms(before)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


def trajectory(config: TrainConfig, steps: int, init: dict[str, Any] | None = None,
               batch_order: torch.Tensor | None = None) -> tuple[Trajectory, dict[str, Any]]:
    """Run `steps` optimizer steps of `config` from `init` (another run's initial state, default: its own).

    Returns the trajectory and this run's initial state (to start another run from). `batch_order`
    permutes the images of every batch (for the round-off reference).
    """
    from trainer.engine import Run, TrainingFailure

    run = Run(config, None, None)
    if run.device.type == "cuda" and config.system.cudnn_benchmark:
        raise ParityError("cannot be made deterministic on cuda: system.cudnn_benchmark picks kernels by timing them")
    with deterministic(run.device):
        run.build()
        if init is not None:
            run.student.load_state_dict(init["student"])
            run.teacher.load_state_dict(init["teacher"])
        state = {"student": _clone(run.student.state_dict()), "teacher": _clone(run.teacher.state_dict())}
        run.batch_order = batch_order
        run.record_grad_norms = True
        start = {n: p.detach().float().cpu().clone() for n, p in run.student.named_parameters()}
        names = [n for n, p in run.student.named_parameters() if p.requires_grad]
        t0 = time.perf_counter()
        losses, norms = [], []
        batches = None
        for step in range(steps):
            epoch, offset = divmod(step, run.steps_per_epoch)
            if offset == 0 or batches is None:
                run.sampler.epoch, run.sampler.start = epoch, offset * config.optim.accumulation_steps
                batches = iter(run.loader)
            try:
                losses.append(run.train_step(batches))
            except TrainingFailure as exc:
                raise _Diverged(str(exc)) from None
            norms.append(run.grad_norms.clone())
            run.step += 1
        seconds = time.perf_counter() - t0
        outputs = _fixed_batch_outputs(run)
    return Trajectory(
        losses=losses, param_grad_norms=torch.stack(norms), param_names=names, start=start,
        weights={n: p.detach().float().cpu().clone() for n, p in run.student.named_parameters()},
        buffers={n: b.detach().cpu().clone() for n, b in run.student.named_buffers()},
        outputs=outputs, seconds=seconds,
    ), state


class _Diverged(RuntimeError):
    """A trajectory that stopped at a non-finite loss or gradient (the trainer's own check)."""


def _clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


@torch.no_grad()
def _fixed_batch_outputs(run, n: int = 64) -> torch.Tensor:
    """The student's head outputs, in eval mode, for the first `n` training images as plain views."""
    images = run.splits.train.__getitems__(list(range(min(n, len(run.splits.train)))))
    view = run.multicrop.plain(images, run.cfg.crops.global_size).contiguous(memory_format=run.memory_format)
    was = run.student.training
    run.student.eval()
    with run.autocast():
        out = run.student([view]).float().cpu()
    run.student.train(was)
    return out


# ---- comparing two trajectories ------------------------------------------------------------------

#: Quantities compared at every step (the others once, after the last step).
PER_STEP = ("loss", "grad_norm", "param_grad_norms")


def compare(a: Trajectory, b: Trajectory) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Relative differences of `b` from `a`: per step for `PER_STEP` (the worst parameter for the
    per-parameter norms), one value for the rest; and where each value was found."""
    steps = min(len(a.losses), len(b.losses))
    diffs: dict[str, torch.Tensor] = {}
    where: dict[str, list[str]] = {}
    la, lb = (torch.tensor(t.losses[:steps], dtype=torch.float64) for t in (a, b))
    diffs["loss"], where["loss"] = _rel(la, lb), [f"step {i}" for i in range(steps)]
    # A step a grad scaler skipped (non-finite gradients, by design of fp16 scaling) has no gradient to compare.
    skipped = a.skipped[:steps] | b.skipped[:steps]
    diffs["grad_norm"] = torch.where(skipped, 0.0, _rel(a.grad_norms[:steps], b.grad_norms[:steps]))
    where["grad_norm"] = [f"step {i}" + (" (skipped by the grad scaler)" if skipped[i] else "") for i in range(steps)]
    per = torch.nan_to_num(_rel(a.param_grad_norms[:steps], b.param_grad_norms[:steps]), nan=math.inf)
    per = torch.where(skipped[:, None], 0.0, per)
    worst, index = per.max(dim=1) if per.shape[1] else (torch.zeros(steps, dtype=torch.float64), torch.zeros(steps, dtype=torch.long))
    diffs["param_grad_norms"] = worst
    where["param_grad_norms"] = [f"{where['grad_norm'][i]}, {a.param_names[int(j)]}" for i, j in enumerate(index)]
    # Weights relative to how far the steps moved them: the first steps are tiny steps of the lr warm-up.
    moved = {n: float((w - a.start[n]).double().norm()) for n, w in a.weights.items()}
    gaps = {n: float((b.weights[n] - w).double().norm()) for n, w in a.weights.items()}
    diffs["weights"], where["weights"] = _worst_of({n: _ratio(gaps[n], moved[n]) for n in gaps})
    buffers = {}
    for name, ba in a.buffers.items():
        bb = b.buffers[name]
        buffers[name] = float(_rel_norm(ba.double(), bb.double())) if ba.is_floating_point() else (
            0.0 if torch.equal(ba, bb) else math.inf)
    diffs["buffers"], where["buffers"] = _worst_of(buffers)
    diffs["outputs"], where["outputs"] = torch.tensor([float(_rel_norm(a.outputs.double(), b.outputs.double()))]), ["fixed batch"]
    return diffs, where


def _ratio(gap: float, scale: float) -> float:
    if gap == 0.0:
        return 0.0
    return gap / scale if scale > 0 and math.isfinite(gap) else math.inf


def _worst_of(values: dict[str, float]) -> tuple[torch.Tensor, list[str]]:
    if not values:
        return torch.zeros(1, dtype=torch.float64), ["-"]
    name = max(values, key=lambda n: values[n] if not math.isnan(values[n]) else math.inf)
    return torch.tensor([values[name]], dtype=torch.float64), [name]


def _rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise |a - b| / |a|; 0 where equal, inf where only `b` is non-finite or `a` is 0."""
    a, b = a.double(), b.double()
    out = torch.where(a == b, torch.zeros_like(a), (a - b).abs() / a.abs())
    return torch.where(torch.isfinite(a) & ~torch.isfinite(b), torch.full_like(out, math.inf), out)


def _rel_norm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if not bool(torch.isfinite(b).all()):
        return torch.tensor(math.inf)
    d, n = (a - b).norm(), a.norm()
    return d / n if n > 0 else (d * math.inf if d > 0 else d)


# ---- tolerances and the check --------------------------------------------------------------------


def knob_differences(a: TrainConfig, b: TrainConfig, source: str = "parity") -> dict[str, list[Any]]:
    """{path: [A's value, B's value, class]} for every knob that differs; a method knob or a differing
    non-knob (seed, device, data set) is refused with one line."""
    knobs: dict[str, list[Any]] = {}
    config = a.to_dict()
    for path, (va, vb) in differences(config, b.to_dict()).items():
        if path.startswith(IGNORED_PREFIXES):
            continue
        if path in NOT_KNOBS:
            raise ParityError(f"{source}: {path} differs ({va!r} -> {vb!r}); parity compares runs that differ only in "
                              f"exact or approximate knobs, and {path} is not a knob ({NOT_KNOBS[path]})")
        cls = knob_class(path, config)
        if cls not in (EXACT, APPROXIMATE):
            why = knob_note(path, config) or "it changes what is learned"
            raise ParityError(f"{source}: {path} is a method knob here ({va!r} -> {vb!r}): {why}, so parity cannot "
                              f"judge it; its quality needs a kNN check")
        knobs[path] = [va, vb, cls]
    return knobs


def round_off_reference(a: TrainConfig, steps: int, base: Trajectory | None = None,
                        init: dict[str, Any] | None = None) -> dict[str, list[float]]:
    """The same `steps` steps of `a` with the images of every batch in another order: the same sums,
    added in another order. How far that moves each quantity is the round-off this run amplifies."""
    if base is None:
        base, init = trajectory(a, steps)
    order = torch.randperm(a.optim.batch_size, generator=torch.Generator().manual_seed(a.system.seed + 1))
    shuffled, _ = trajectory(a, steps, init=init, batch_order=order)
    return {q: v.tolist() for q, v in compare(base, shuffled)[0].items()}


def exact_tolerance(reference: dict[str, list[float]]) -> dict[str, list[float]]:
    """`EXACT_FACTOR` x the round-off reference, per step, never below `EXACT_FLOOR`."""
    return {q: [max(EXACT_FLOOR, EXACT_FACTOR * v) for v in values] for q, values in reference.items()}


def approximate_band(a: TrainConfig, approx: dict[str, Any], steps: int, seeds: list[int],
                     progress: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """The worst difference, per step, between `a` and `a` with the approximate knobs `approx`, over `seeds`."""
    band: dict[str, list[float]] = {}
    for seed in seeds:
        ref = a.with_overrides({"system.seed": seed})
        base, init = trajectory(ref, steps)
        try:
            low, _ = trajectory(ref.with_overrides(approx), steps, init=init)
        except _Diverged as exc:
            raise ParityError(f"the band of {_label(approx)} cannot be measured: seed {seed} diverged ({exc})") from None
        diffs, _ = compare(base, low)
        for q, v in diffs.items():
            band[q] = [max(x, y) for x, y in zip(band.get(q, [0.0] * len(v)), v.tolist())]
        if progress:
            progress(f"band of {_label(approx)} at seed {seed}: max rel. diff {max(float(v.max()) for v in diffs.values()):.1e}")
    return band


def _label(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides.items())


def check(a: TrainConfig, b: TrainConfig, steps: int = DEFAULT_STEPS, seeds: int = 3,
          reference: dict[str, list[float]] | None = None, bands: dict[str, dict[str, list[float]]] | None = None,
          base: tuple[Trajectory, dict[str, Any]] | None = None,
          progress: Callable[[str], None] | None = None, source: str = "parity") -> ParityResult:
    """Parity of `b` against `a` over `steps` optimizer steps (see the module docstring).

    `reference` (A's round-off amplification), `bands` (per approximate-knob label) and `base` (A's
    trajectory and initial state) may come from an earlier check of the same `a` at the same `steps`;
    what is missing is measured here. `bands` is updated in place so a caller can keep it.
    """
    if steps < 1:
        raise ParityError(f"{source}: steps must be at least 1 (got {steps})")
    knobs = knob_differences(a, b, source)
    say = progress or (lambda line: None)
    t0 = time.perf_counter()
    base_run, init = base if base is not None else trajectory(a, steps)
    try:
        other, _ = trajectory(b, steps, init=init)
        diffs, where = compare(base_run, other)
    except _Diverged as exc:
        diffs = {q: torch.full((steps if q in PER_STEP else 1,), math.inf) for q in QUANTITIES}
        where = {q: [f"non-finite: {exc}"] * len(diffs[q]) for q in QUANTITIES}
    if reference is None:
        say("measuring the round-off reference (A with every batch in another order)")
        reference = round_off_reference(a, steps, base_run, init)
    tolerance = exact_tolerance(reference)
    source_text = f"{EXACT_FACTOR:g} x round-off reference (A, batch reordered), floor {EXACT_FLOOR:g}"
    approx = {p: v[1] for p, v in knobs.items() if v[2] == APPROXIMATE}
    if approx:
        label = _label(approx)
        bands = {} if bands is None else bands
        if label not in bands:
            say(f"measuring the band of {label} at {seeds} seed(s)")
            bands[label] = approximate_band(a, approx, steps, [a.system.seed + 1 + i for i in range(seeds)], say)
        # One band per quantity, the worst of every step and seed: a few seeds are too few samples to give each
        # step its own (bf16's step-0 loss difference at a fourth seed was 2.1x the worst of three).
        tolerance = {q: [max(t, BAND_MARGIN * max(bands[label][q])) for t in tolerance[q]] for q in QUANTITIES}
        source_text += f"; {label}: {BAND_MARGIN:g} x its band over {seeds} seed(s)"
    worst: dict[str, dict[str, Any]] = {}
    for q in QUANTITIES:
        values, tol = diffs[q].tolist(), tolerance[q]
        ratios = [_ratio(v, t) for v, t in zip(values, tol)]
        i = max(range(len(ratios)), key=lambda k: ratios[k] if not math.isnan(ratios[k]) else math.inf)
        worst[q] = {"diff": values[i], "tolerance": tol[i], "ratio": ratios[i], "where": where[q][i]}
    failed = [q for q in QUANTITIES if not worst[q]["ratio"] <= 1.0]
    return ParityResult(
        verdict="failed" if failed else "ok", knobs=knobs, steps=steps, worst=worst, failed=failed,
        tolerance_source=source_text, reference=reference, seconds=time.perf_counter() - t0, device=_device_of(a),
    )


def _device_of(config: TrainConfig) -> str:
    from trainer.engine import resolve_device

    return resolve_device(config.system.device).type
