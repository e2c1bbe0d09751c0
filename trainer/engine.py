"""`train(config, callback)`: the one way a config becomes a training run.

The CLI, the tuner and the tests all drive this function; measurement lives inside the loop and leaves
through the callback (see `trainer.events`), so every caller sees the same numbers.

A run: build (data, student/teacher, optimizer, schedules) -> kNN before training -> steps, the first
of which form the speed phase (warm-up steps, then timed windows with per-phase timers) -> kNN at the
configured points and at the end -> summary. Failures (non-finite loss, out of memory, a DataLoader
worker that died, a compile error) end the run with a `TrainingFailure` reason, returned, not raised.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer.allocator import host_allocator, set_host_allocator
from trainer.augment import MultiCrop
from trainer.config import ConfigError, TrainConfig
from trainer.data import EpochBatchSampler, build_splits, collate_batch
from trainer.distributed import average_batchnorm_statistics, sync_batchnorm_view
from trainer.events import Callback, SpeedReport, TrainingFailure
from trainer.knn import extract_features, weighted_knn
from trainer.loss import DINOLoss, view_agreement
from trainer.measure import PhaseTimer, SpeedClock, peak_memory_mb, reset_peak_memory, summarize_windows
from trainer.model import DINOHead, MultiCropWrapper, build_backbone
from trainer.runlog import LOG, RunLog
from trainer.schedules import cosine_schedule
from trainer.warmstart import CHECKPOINT, load_init

SUMMARY = "summary.json"
#: Consecutive steps skipped by fp16's grad scaler after which a run has failed (the first few are expected:
#: the scale starts at 2**16 and halves on each overflow).
SCALER_SKIPS_FAIL = 20


@dataclass
class RunResult:
    """How a run ended: `status` "ok" or "failed", the summary (as in summary.json), the speed phase."""

    status: str
    summary: dict[str, Any]
    speed: SpeedReport | None = None
    failure: dict[str, Any] | None = None
    losses: list[float] = field(default_factory=list)


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_type: str) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when available, else CPU; cuda without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("system.device: 'cuda' asked for, but torch sees no CUDA device (use auto or cpu)")
    return torch.device(name)


def classify_failure(exc: BaseException, step: int | None) -> TrainingFailure:
    """Map an exception from the loop to a failure reason a caller can record."""
    if isinstance(exc, TrainingFailure):
        return exc
    msg = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:500]
    low = msg.lower()
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in low or "can't allocate memory" in low:
        return TrainingFailure("oom", msg, step)
    if "dataloader worker" in low:
        return TrainingFailure("dataloader", msg, step)
    if type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")) or "backendcompilerfailed" in low:
        return TrainingFailure("compile", msg, step)
    return TrainingFailure("error", msg, step)


def _injected_fault(step: int) -> str | None:
    """Test hook: `TRAINER_INJECT_FAULT=oom@N|nan@N|grad@N|kill@N` triggers that fault at optimizer step N
    (`grad`: one parameter's gradient turns non-finite while the loss stays finite)."""
    spec = os.environ.get("TRAINER_INJECT_FAULT", "")
    if "@" not in spec:
        return None
    kind, at = spec.split("@", 1)
    return kind if at.isdigit() and int(at) == step else None


def _planted_math_bug(cfg: TrainConfig) -> bool:
    """Test hook for parity: `TRAINER_INJECT_FAULT=mathbug:PATH` silently scales the first backbone
    convolution's gradient by 1.01 in every step of a run whose config field PATH (e.g.
    `system.channels_last`) is set (true, or a number above 0), the way a kernel bug behind one knob
    would change the math without any error."""
    spec = os.environ.get("TRAINER_INJECT_FAULT", "")
    if not spec.startswith("mathbug:"):
        return False
    node: Any = cfg.to_dict()
    for part in spec.split(":", 1)[1].split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return bool(node) and node not in ("off", "fp32")


class Run:
    """The state of one training run; `execute` is the loop."""

    def __init__(self, cfg: TrainConfig, callback: Callback | None, out_dir: Path | None):
        self.cfg, self.callback, self.out_dir = cfg, callback, out_dir
        self.device = resolve_device(cfg.system.device)
        self.dist = Dist.from_env(self.device.type)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        self.stop_requested = False
        # Per-parameter gradient norms (before clipping) of the last step, when a caller asks (parity).
        self.record_grad_norms = False
        self.scaler_skips = 0  # consecutive optimizer steps fp16's grad scaler skipped
        self.grad_norms: torch.Tensor | None = None
        # A permutation of the images within every batch (parity's round-off reference: the same sums
        # in another order). None in every ordinary run.
        self.batch_order: torch.Tensor | None = None
        self.losses: list[float] = []
        self.evals: list[dict[str, Any]] = []
        self.step = 0
        self.run_log: RunLog | None = None  # log.jsonl, on rank 0 when the run has a folder
        self.average_teacher_bn = False

    # ---- events ---------------------------------------------------------------------------

    def emit(self, event: str, payload: dict[str, Any]) -> None:
        if self.run_log is not None:
            self.run_log(event, payload)
        if self.callback is not None and self.dist.main:
            if self.callback(event, payload):
                self.stop_requested = True

    # ---- build ------------------------------------------------------------------------------

    def build(self) -> None:
        cfg, t0 = self.cfg, time.perf_counter()
        torch.manual_seed(cfg.system.seed)
        torch.backends.cuda.matmul.allow_tf32 = cfg.system.tf32
        torch.backends.cudnn.allow_tf32 = cfg.system.tf32
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = cfg.system.cudnn_benchmark
        self.splits = build_splits(cfg.data)
        self.multicrop = MultiCrop(cfg.crops, cfg.augment, self.device)
        backbone, dim = build_backbone(cfg.model, cfg.crops.global_size)
        # A warm start replaces the random backbone before student and teacher are made from it; the RNG the
        # head's initialization draws from is untouched, so the head starts as it would from random weights.
        self.init_loaded = load_init(backbone, cfg) if cfg.model.init else None
        student = MultiCropWrapper(backbone, DINOHead(dim, cfg.model.head), concat=cfg.crops.concat_same_resolution)
        teacher = copy.deepcopy(student)
        for p in teacher.parameters():
            p.requires_grad = False
        self.memory_format = torch.channels_last if cfg.system.channels_last else torch.contiguous_format
        student.to(self.device, memory_format=self.memory_format)
        teacher.to(self.device, memory_format=self.memory_format)
        student.backbone.grad_checkpointing = cfg.system.grad_checkpointing
        self.student, self.teacher = student, teacher  # unwrapped modules: EMA, checkpoints, evaluation
        teacher_step = teacher  # what a training step runs as the teacher
        if self.dist.world > 1:
            if self.device.type == "cuda":
                student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
                self.student = student
            student = torch.nn.parallel.DistributedDataParallel(
                student, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            # DDP has just broadcast rank 0's weights to every rank; the teacher starts from those too.
            teacher.load_state_dict(self.student.state_dict())
            # DINO synchronizes the teacher's BatchNorm as the student's (trainer.distributed says how).
            if self.device.type == "cuda":
                teacher_step = sync_batchnorm_view(teacher)
            else:
                self.average_teacher_bn = True
        self.student_fwd, self.teacher_fwd = student, teacher_step
        if cfg.system.compile != "off":
            import torch._dynamo as dynamo

            mode = None if cfg.system.compile == "default" else cfg.system.compile
            # Each run compiles afresh: code compiled by an earlier run in this process (tuner confirm and
            # explain measure several runs in one process) would otherwise count against dynamo's cache
            # limit, past which it runs the backbone eagerly without a word, and would hide compile time.
            dynamo.reset()
            dynamo.config.suppress_errors = cfg.system.compile_fallback
            # The backbone only (the head and loss stay eager), in the modules a training step runs.
            for wrapper in (self.student, teacher_step):
                wrapper.compile_backbone(mode, cfg.system.compile_dynamic)

        o, world = cfg.optim, self.dist.world
        self.steps_per_epoch = len(self.splits.train) // (o.batch_size * world) // o.accumulation_steps
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"optim.batch_size={o.batch_size} x accumulation_steps={o.accumulation_steps} x {world} process(es) "
                f"is larger than the {len(self.splits.train)} training images")
        self.total_steps = cfg.budget.steps or cfg.budget.epochs * self.steps_per_epoch  # the schedules' length
        self.stop_step = min(self.total_steps, cfg.budget.stop_at_step or self.total_steps)  # where this run ends
        self.images_per_step = o.batch_size * o.accumulation_steps * world
        spe, total = self.steps_per_epoch, self.total_steps
        base_lr = o.lr * self.images_per_step / 256.0
        self.lr = cosine_schedule(base_lr, o.min_lr, total, int(o.warmup_epochs * spe))
        self.wd = cosine_schedule(o.weight_decay, o.weight_decay_end, total)
        self.momentum = cosine_schedule(o.momentum_teacher, 1.0, total)
        self.freeze_last_steps = int(o.freeze_last_layer_epochs * spe)
        decay = [p for n, p in self.student.named_parameters() if p.requires_grad and p.ndim > 1 and not n.endswith("bias")]
        no_decay = [p for n, p in self.student.named_parameters() if p.requires_grad and (p.ndim <= 1 or n.endswith("bias"))]
        # foreach (one kernel per op over all tensors) rather than torch's CPU default, a Python loop over the
        # parameters: the same arithmetic in the same order, bit for bit (tested), fewer passes over memory.
        self.optimizer = torch.optim.AdamW(
            [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=base_lr, fused=o.fused or None,
            foreach=None if o.fused else True)
        self.last_layer_params = [p for n, p in self.student.named_parameters() if "last_layer" in n]
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.system.precision == "fp16" else None
        views = cfg.crops.global_crops + cfg.crops.local_crops
        lc = cfg.loss
        self.dino_loss = DINOLoss(
            cfg.model.head.out_dim, cfg.crops.global_crops, views, lc.student_temp, lc.teacher_temp,
            lc.warmup_teacher_temp, int(lc.warmup_teacher_temp_epochs * spe), total, lc.center_momentum, lc.pairing,
        ).to(self.device)
        self.sampler = EpochBatchSampler(len(self.splits.train), o.batch_size, cfg.system.seed, 0, 0, self.dist.rank, world)
        s = cfg.system
        self.loader = torch.utils.data.DataLoader(
            self.splits.train, batch_sampler=self.sampler, collate_fn=collate_batch, num_workers=s.num_workers,
            pin_memory=s.pin_memory and self.device.type == "cuda", prefetch_factor=s.prefetch_factor,
            persistent_workers=s.persistent_workers,
        )
        self.timer = PhaseTimer(self.device)
        self.student_params = [p for p in self.student.parameters()]
        self.teacher_params = [p for p in self.teacher.parameters()]
        self.math_bug = _planted_math_bug(cfg)
        self.build_s = time.perf_counter() - t0
        n_params = sum(p.numel() for p in self.student.parameters()) / 1e6
        self.emit("build", {"build_s": self.build_s, "device": str(self.device), "images_per_step": self.images_per_step,
                            "params_m": round(n_params, 3), "steps_per_epoch": spe, "total_steps": self.stop_step,
                            "schedule_steps": total,
                            "init": self.init_loaded})

    # ---- one optimizer step -------------------------------------------------------------------

    def autocast(self):
        p = self.cfg.system.precision
        if p == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if p == "bf16" else torch.float16)

    def train_step(self, batches) -> float:
        """One optimizer step over `accumulation_steps` micro-batches; returns the mean loss."""
        cfg, step, timer = self.cfg, self.step, self.timer
        accum, g = cfg.optim.accumulation_steps, self._step_generator()
        fault = _injected_fault(step)
        if fault == "kill":
            os._exit(137)
        if fault == "oom":
            raise torch.OutOfMemoryError("injected: out of memory (TRAINER_INJECT_FAULT)")
        total_loss = torch.zeros((), device=self.device)
        timer.start()
        for micro in range(accum):
            images = next(batches)
            timer.mark("data")
            views = [v.contiguous(memory_format=self.memory_format) for v in self.multicrop(images, g)]
            if self.batch_order is not None:
                views = [v[self.batch_order.to(v.device)] for v in views]
            timer.mark("augment")
            sync = self.student_fwd.no_sync() if micro < accum - 1 and self.dist.world > 1 else contextlib.nullcontext()
            with sync:
                with self.autocast():
                    with torch.no_grad():
                        teacher_out = self.teacher_fwd(views[: cfg.crops.global_crops])
                    timer.mark("teacher_forward")
                    student_out = self.student_fwd(views)
                    timer.mark("student_forward")
                    loss = self.dino_loss(student_out, teacher_out, step)
                    if fault == "nan":
                        loss = loss * float("nan")
                    timer.mark("loss")
                scaled = loss / accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                timer.mark("backward")
            total_loss += loss.detach()
        loss_value = total_loss.item() / accum
        if not math.isfinite(loss_value):
            raise TrainingFailure("nan", f"loss is {loss_value}", step)
        if fault == "grad":
            self.student_params[0].grad.view(-1)[0] = float("nan")
        if self.math_bug:
            self.student_params[0].grad.mul_(1.01)
        self.optimizer_step(step)
        timer.mark("optimizer")
        self.ema_update(self.momentum[step])
        timer.mark("ema")
        return loss_value

    def _step_generator(self) -> torch.Generator:
        # Augmentation randomness depends on (seed, step, rank) only, so a resumed run repeats it exactly.
        return torch.Generator().manual_seed((self.cfg.system.seed * 1_000_003 + self.step) * 101 + self.dist.rank)

    def optimizer_step(self, step: int) -> None:
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = float(self.lr[step])  # a Python float: numpy scalars make checkpoints unreadable with weights_only
            if i == 0:
                group["weight_decay"] = float(self.wd[step])
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        clip = self.cfg.optim.clip_grad
        grads = [p.grad for p in self.student_params if p.grad is not None]
        norms = torch._foreach_norm(grads) if grads else []
        if self.record_grad_norms:
            self.grad_norms = torch.stack(norms).detach().float().cpu() if norms else torch.zeros(0)
        if norms and not self.scaler and not bool(torch.isfinite(torch.stack(norms)).all()):
            # Without a grad scaler nothing would skip this step: stop here, naming the parameter, rather than
            # let NaN or overflowing values reach the weights. (fp16's scaler skips such steps by design.)
            named = [n for n, p in self.student.named_parameters() if p.grad is not None]
            name = next(n for n, norm in zip(named, norms) if not torch.isfinite(norm))
            raise TrainingFailure("nan", f"non-finite gradient norm in {name} (precision {self.cfg.system.precision})", step)
        if clip > 0 and grads:
            # DINO clips each parameter's gradient norm separately (utils.clip_gradients). The others would be
            # multiplied by exactly 1.0: on a CPU, where reading the coefficients costs nothing, only the
            # gradients that need it are multiplied (one pass over memory less); on a GPU, reading them would
            # synchronize the host, so all are (the same numbers either way).
            coef = clip / (torch.stack(norms) + 1e-6)
            if coef.device.type == "cpu":
                clipped = (coef < 1.0).nonzero().flatten().tolist()
                if clipped:
                    torch._foreach_mul_([grads[i] for i in clipped], list(coef[clipped].unbind()))
            else:
                torch._foreach_mul_(grads, list(coef.clamp(max=1.0).unbind()))
        if step < self.freeze_last_steps:
            for p in self.last_layer_params:
                p.grad = None
        if self.scaler:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            # A step the scaler skips (non-finite gradients at this scale) is by design; a run of them is a failure.
            self.scaler_skips = self.scaler_skips + 1 if self.scaler.get_scale() < scale else 0
            if self.scaler_skips >= SCALER_SKIPS_FAIL:
                raise TrainingFailure("nan", f"the grad scaler skipped {self.scaler_skips} steps in a row "
                                      f"(non-finite gradients down to scale {self.scaler.get_scale():g})", step)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def ema_update(self, m: float) -> None:
        torch._foreach_mul_(self.teacher_params, m)
        torch._foreach_add_(self.teacher_params, self.student_params, alpha=1.0 - m)
        if self.average_teacher_bn:
            average_batchnorm_statistics(self.teacher)

    def entropy_report(self) -> dict[str, float | None]:
        """The last tracked teacher entropies (nats) beside their maximum, ln K: the collapse monitor."""
        e = self.dino_loss.entropy
        return {"teacher_entropy": e.get("teacher"), "batch_entropy": e.get("batch"),
                "max_entropy": math.log(self.cfg.model.head.out_dim)}

    # ---- evaluation ----------------------------------------------------------------------------

    def evaluate(self) -> dict[str, Any]:
        """Weighted kNN of the teacher's and the student's backbones (train split as bank, validation
        split as queries), plus the teacher's view agreement and the evaluation's wall time.

        Both backbones, because an EMA teacher barely moves in a short trial: the student's number is the
        one that shows what the steps did. Before training the two are the same weights, so the teacher's
        numbers are reported for both (identical by construction, and half the cost).
        """
        result: dict[str, Any] = {"step": self.step, "epoch": self.step / self.steps_per_epoch}
        if self.dist.main:
            t0 = time.perf_counter()
            top1, top5 = self.knn(self.teacher.backbone)
            if self.step == 0:
                s_top1, s_top5 = top1, top5
            else:
                s_top1, s_top5 = self.knn(self.student.backbone)
            result.update(knn_top1=top1, knn_top5=top5, student_knn_top1=s_top1, student_knn_top5=s_top5,
                          view_agreement=self.view_agreement(), bn_stats=self.cfg.eval.bn_stats,
                          eval_s=time.perf_counter() - t0)
            self.evals.append(result)
            self.emit("eval", result)
        if self.dist.world > 1:
            dist.barrier()
        return result

    @torch.no_grad()
    def knn(self, backbone: torch.nn.Module) -> tuple[float, float]:
        """Weighted kNN top-1/top-5 (percent) of `backbone`'s features, with the configured BatchNorm statistics."""
        e, size = self.cfg.eval, self.cfg.crops.global_size
        view = lambda batch: self.multicrop.plain(batch, size)  # noqa: E731
        if e.bn_stats == "precise":
            backbone = precise_bn_copy(backbone, self.splits.train, view, e.bn_images, e.batch_size)
        # In fp32 whatever the training precision, as DINO's eval_knn: the kNN judges the weights, and a bf16
        # feature pass would cost a trial as much time as training on a CPU without native bf16.
        bank = extract_features(backbone, self.splits.train, view, e.batch_size)
        queries = extract_features(backbone, self.splits.val, view, e.batch_size)
        return weighted_knn(bank, self.splits.train_labels, queries, self.splits.val_labels,
                            e.knn_k, e.knn_temperature, self.splits.num_classes)

    @torch.no_grad()
    def view_agreement(self, n: int = 256) -> float:
        """`trainer.loss.view_agreement` of the teacher's outputs for two global views of `n` training images.

        The teacher runs as it does in a training step (BatchNorm on batch statistics); its running
        statistics are restored afterwards. The views come from a fixed generator, so evaluations of one
        run differ only by the weights.
        """
        images = self.splits.train.__getitems__(list(range(min(n, len(self.splits.train)))))
        views = self.multicrop.global_views(images, 2, torch.Generator().manual_seed(self.cfg.system.seed + 7))
        buffers = [b.clone() for b in self.teacher.buffers()]
        was_training = self.teacher.training
        self.teacher.train()
        with self.autocast():
            a, b = (self.teacher([v.contiguous(memory_format=self.memory_format)]) for v in views)
        self.teacher.train(was_training)
        for saved, live in zip(buffers, self.teacher.buffers()):
            live.copy_(saved)
        return view_agreement(a, b)

    # ---- checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self, extra: dict[str, Any]) -> None:
        if self.out_dir is None or not self.dist.main:
            return
        state = {
            "config": self.cfg.to_dict(), "step": self.step, "losses": self.losses, "evals": self.evals,
            "student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(), "center": self.dino_loss.center,
            "scaler": self.scaler.state_dict() if self.scaler else None, **extra,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.out_dir / (CHECKPOINT + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.out_dir / CHECKPOINT)

    def load_checkpoint(self) -> dict[str, Any]:
        path = self.out_dir / CHECKPOINT if self.out_dir else None
        if path is None or not path.is_file():
            raise ConfigError(f"--resume: no checkpoint at {path}")
        state = torch.load(path, map_location=self.device, weights_only=False)
        if _segment_free(state["config"]) != _segment_free(self.cfg.to_dict()):
            raise ConfigError(f"--resume: {path} was written by a different config; resume with the same config "
                              "(only budget.stop_at_step and when to evaluate may differ)")
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.dino_loss.center.copy_(state["center"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.losses, self.evals = state["step"], state["losses"], state["evals"]
        return state


def _any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` is true on any rank (one small all-reduce): ranks must leave the loop at the same step."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _segment_free(config: dict[str, Any]) -> dict[str, Any]:
    """A config without what may differ between the segments of one run: where it stops, and when it
    evaluates (evaluation does not touch the training state)."""
    drop = {"budget": ("stop_at_step",), "eval": ("every_steps", "every_epochs")}
    return {**config, **{section: {k: v for k, v in config.get(section, {}).items() if k not in keys}
                         for section, keys in drop.items()}}


@torch.no_grad()
def precise_bn_copy(backbone: torch.nn.Module, images, to_view, n_images: int, batch_size: int) -> torch.nn.Module:
    """A copy of `backbone` whose BatchNorm statistics are the average over the first `n_images` of
    `images` in their evaluation view (torch's `update_bn`: statistics reset, cumulative average).

    Why: the running statistics a DINO run leaves are an exponential average over augmented, partly
    local-crop batches (and mean 0 / var 1 placeholders before training), so a kNN through them measures
    the statistics as much as the weights. A copy, so the training run never sees the recomputation.
    SyncBatchNorm (DDP on GPUs) becomes plain BatchNorm in the copy: only rank 0 evaluates.
    """
    copy_ = _plain_batchnorm(copy.deepcopy(backbone))
    copy_.grad_checkpointing = False  # no backward here; recomputation would only cost time
    n = min(n_images, len(images))
    batches = (to_view(images.__getitems__(list(range(start, min(n, start + batch_size)))))
               for start in range(0, n, batch_size))
    torch.optim.swa_utils.update_bn(batches, copy_)
    return copy_.eval()


def _plain_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """`module` with every SyncBatchNorm replaced by an equivalent BatchNorm2d (same parameters and buffers)."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.SyncBatchNorm):
            bn = torch.nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                      child.track_running_stats).to(child.weight.device)
            bn.load_state_dict(child.state_dict())
            setattr(module, name, bn)
        else:
            _plain_batchnorm(child)
    return module


def train(config: TrainConfig, callback: Callback | None = None, out_dir: str | Path | None = None,
          resume: bool = False, speed_only: bool = False) -> RunResult:
    """Run `config` to its budget (or only its speed phase) and return how it went.

    `callback(event, payload)` receives the events in `trainer.events`; `out_dir` (rank 0) receives
    checkpoints and `summary.json`; `resume` continues from `out_dir`'s checkpoint. A `ConfigError`
    (a user's mistake) is raised; any failure during the run is returned as `status="failed"`.
    """
    run = Run(config, callback, Path(out_dir) if out_dir is not None else None)
    if run.out_dir is not None and run.dist.main:
        run.run_log = RunLog(run.out_dir / LOG, append=resume)
    t_start = time.perf_counter()
    set_host_allocator(config.system.host_allocator)  # before the run allocates
    reset_peak_memory(run.device)
    try:
        run.build()
        return _loop(run, resume, speed_only, t_start)
    except ConfigError:
        raise
    except Exception as exc:  # a failed run is a result, with a reason
        failure = classify_failure(exc, run.step).as_dict()
        run.emit("failure", failure)
        summary = {"status": "failed", "failure": failure, "steps": run.step, "wall_s": time.perf_counter() - t_start}
        _write_summary(run, summary)
        return RunResult("failed", summary, None, failure, run.losses)
    finally:
        if run.dist.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _loop(run: Run, resume: bool, speed_only: bool, t_start: float) -> RunResult:
    cfg, m = run.cfg, run.cfg.measure
    state = run.load_checkpoint() if resume else {}
    knn_initial = state.get("knn_initial")
    speed: SpeedReport | None = None
    if state.get("speed"):
        speed = SpeedReport(**state["speed"])
    if not resume and cfg.eval.at_start and not speed_only:
        knn_initial = run.evaluate()
    clock = SpeedClock(m.warmup_steps, m.windows, m.window_steps, m.profile_steps, run.device, run.timer,
                       run.images_per_step, m.epoch_start_steps if cfg.system.num_workers > 0 else 0)
    first_step_s = 0.0
    # Training time carries over a resume, so time limits and training throughput cover the whole run.
    train_time, log_every = state.get("train_s", 0.0), max(1, min(50, run.steps_per_epoch))
    t_log, logged_step = time.perf_counter(), run.step

    def progress() -> dict[str, Any]:  # what a checkpoint keeps beyond the modules
        return {"knn_initial": knn_initial, "speed": speed.as_dict() if speed else None, "train_s": train_time}

    stop_reason = None
    while run.step < run.stop_step and not run.stop_requested:
        epoch, start = divmod(run.step, run.steps_per_epoch)
        run.sampler.epoch, run.sampler.start = epoch, start * cfg.optim.accumulation_steps
        batches = iter(run.loader)
        for _ in range(start, run.steps_per_epoch):
            in_speed_phase = speed is None and run.step < clock.total_steps
            if in_speed_phase and clock.opens_epoch_start(run.step):
                # The start of an epoch, timed: the old iterator goes (its workers shut down, as at an epoch's
                # end) and a new one starts them again, from this step's batch, so the data stay the same.
                batches = None
                run.sampler.epoch, run.sampler.start = epoch, (run.step - epoch * run.steps_per_epoch) * cfg.optim.accumulation_steps
                clock.open_epoch_start()
                batches = iter(run.loader)
            if in_speed_phase:
                clock.before_step(run.step)
            else:
                run.timer.enabled = False
            run.dino_loss.track_entropy = (run.step + 1) % log_every == 0 or run.step + 1 == run.stop_step
            t0 = time.perf_counter()
            loss = run.train_step(batches)
            dt = time.perf_counter() - t0
            train_time += dt
            if run.step == 0:
                first_step_s = dt
            run.losses.append(loss)
            run.step += 1
            if in_speed_phase:
                tp = clock.after_step(run.step - 1, dt)
                if tp is not None:
                    run.emit("window", {"step": run.step, "window": len(clock.windows), "throughput_img_s": tp})
                if clock.done:
                    speed = _speed_report(run, clock, first_step_s)
                    run.emit("speed", speed.as_dict())
            if run.step % log_every == 0 or run.step == run.stop_step:
                now = time.perf_counter()
                run.emit("log", {"step": run.step, "epoch": run.step / run.steps_per_epoch, "loss": loss,
                                 "lr": float(run.lr[run.step - 1]), "total_steps": run.total_steps,
                                 "teacher_momentum": float(run.momentum[run.step - 1]),
                                 "throughput_img_s": (run.step - logged_step) * run.images_per_step / max(1e-9, now - t_log),
                                 **run.entropy_report()})
                t_log, logged_step = now, run.step
            if speed_only and speed is not None:
                run.stop_requested = True
            if cfg.budget.time_limit_s and train_time >= cfg.budget.time_limit_s:
                stop_reason = "time_limit"
            if run.dist.world > 1 and _any_rank(run.stop_requested or stop_reason is not None, run.device) and not stop_reason:
                run.stop_requested = True  # a stop seen by one rank (the caller's, a time limit) stops all alike
            if run.stop_requested or stop_reason or run.step >= run.stop_step:
                break
            t_aside = time.perf_counter()
            if cfg.eval.every_steps and run.step % cfg.eval.every_steps == 0:
                run.evaluate()
            if cfg.checkpoint_every_steps and run.step % cfg.checkpoint_every_steps == 0:
                run.save_checkpoint(progress())
            # Evaluations and checkpoints are not training: left out of an open window and of the logged
            # throughput (whose interval then starts that much later, wherever between two log lines they fell).
            t_log += clock.set_aside(t_aside)
        else:  # the epoch ran to its end
            t_aside = time.perf_counter()
            if cfg.eval.every_epochs and (epoch + 1) % cfg.eval.every_epochs == 0 and run.step < run.stop_step:
                run.evaluate()
            if not cfg.checkpoint_every_steps:
                run.save_checkpoint(progress())
            t_log += clock.set_aside(t_aside)
            continue
        break
    if speed is None and clock.step_s:  # the budget ended inside the speed phase
        speed = _speed_report(run, clock, first_step_s)
    final = run.evaluate() if not speed_only else {}
    run.save_checkpoint(progress())
    summary = _summary(run, speed, knn_initial, final, train_time, time.perf_counter() - t_start,
                       stopped_early=run.stop_requested and not speed_only, stop_reason=stop_reason)
    _write_summary(run, summary)
    run.emit("done", summary)
    return RunResult("ok", summary, speed, None, run.losses)


def _speed_report(run: Run, clock: SpeedClock, first_step_s: float) -> SpeedReport:
    windows = clock.windows or [len(clock.step_s) * run.images_per_step / sum(clock.step_s)]
    median, spread = summarize_windows(windows)
    # The epoch's start, spread over its steps as a training run pays it (see trainer.measure).
    epoch_start_s = clock.epoch_start_cost(run.images_per_step / median)
    epoch_images = run.steps_per_epoch * run.images_per_step
    throughput = median if not epoch_start_s else epoch_images / (epoch_images / median + epoch_start_s)
    window_s, window_steps = (sum(clock.window_s), len(clock.window_s) * clock.window_steps) if clock.window_s else (
        sum(clock.step_s), len(clock.step_s))
    profiled = sum(clock.profile_s)
    mem, kind = peak_memory_mb(run.device)
    step_ms = 1000.0 * window_s / window_steps
    compile_s = max(0.0, first_step_s - step_ms / 1000.0) if run.cfg.system.compile != "off" else 0.0
    return SpeedReport(
        throughput_img_s=throughput, throughput_spread=spread, throughput_windows=windows,
        window_throughput_img_s=median, epoch_start_s=epoch_start_s,
        epoch_start_step_range=clock.epoch_start_range if epoch_start_s is not None else [],
        data_wait_fraction=run.timer.totals.get("data", 0.0) / profiled if profiled else 0.0,
        phases_ms=run.timer.per_step_ms(len(clock.profile_s)), step_ms=step_ms, peak_memory_mb=mem, memory_kind=kind,
        images_per_step=run.images_per_step, warmup_steps=run.cfg.measure.warmup_steps,
        timed_steps=window_steps, first_step_s=first_step_s, compile_s=compile_s, build_s=run.build_s,
        profiled_step_ms=1000.0 * profiled / len(clock.profile_s) if clock.profile_s else 0.0,
        window_step_range=[clock.warmup, clock.warmup + window_steps],
        profiled_step_range=[clock.profile_range[0], clock.profile_range[0] + len(clock.profile_s)],
    )


def _summary(run: Run, speed: SpeedReport | None, initial, final, train_time: float, wall: float, **extra) -> dict:
    mem, kind = peak_memory_mb(run.device)
    s = speed.as_dict() if speed else {}
    initial = initial or {}
    return {
        "status": "ok",
        "knn_top1": final.get("knn_top1"), "knn_top5": final.get("knn_top5"),
        "knn_top1_initial": initial.get("knn_top1"), "knn_top5_initial": initial.get("knn_top5"),
        "student_knn_top1": final.get("student_knn_top1"), "student_knn_top5": final.get("student_knn_top5"),
        "student_knn_top1_initial": initial.get("student_knn_top1"),
        "student_knn_top5_initial": initial.get("student_knn_top5"), "bn_stats": run.cfg.eval.bn_stats,
        "view_agreement_initial": initial.get("view_agreement"), "view_agreement": final.get("view_agreement"),
        "throughput_img_s": s.get("throughput_img_s"), "throughput_spread": s.get("throughput_spread"),
        "data_wait_fraction": s.get("data_wait_fraction"), "phases_ms": s.get("phases_ms"),
        # which optimizer steps each figure came from: throughput from the windows, phases from profiled steps
        "window_step_range": s.get("window_step_range"), "profiled_step_range": s.get("profiled_step_range"),
        "window_throughput_img_s": s.get("window_throughput_img_s"), "epoch_start_s": s.get("epoch_start_s"),
        "epoch_start_step_range": s.get("epoch_start_step_range"),
        "train_throughput_img_s": run.step * run.images_per_step / train_time if train_time else None,
        "peak_memory_mb": mem, "memory_kind": kind, "steps": run.step,
        "epochs": run.step / run.steps_per_epoch, "wall_s": wall, "train_s": train_time,
        "build_s": run.build_s, "compile_s": s.get("compile_s", 0.0), "images_per_step": run.images_per_step,
        "final_loss": run.losses[-1] if run.losses else None, "device": str(run.device), "world_size": run.dist.world,
        "host_allocator": host_allocator(),  # the policy in effect in this process (trainer.allocator)
        "evals": run.evals, **run.entropy_report(), "failure": None, **extra,
    }


def _write_summary(run: Run, summary: dict) -> None:
    if run.out_dir is not None and run.dist.main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        (run.out_dir / SUMMARY).write_text(json.dumps(summary, indent=2, default=float))
