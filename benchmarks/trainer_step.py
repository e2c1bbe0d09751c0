"""The trainer's compute-only DINO step against the official recipe's step and lightly's.

Not a test. Both sides get the same pre-made crops (random tensors of the crop sizes; no data loading,
no augmentation) and do one full optimizer step: teacher forward on the global crops, student forward on
all crops, DINO loss, backward, AdamW, teacher EMA.

- ours: `trainer.engine.Run` built from a synthetic config, driving its own `Run.train_step` (so this
  measures what `trainer train` runs: MultiCropWrapper with one backbone forward per resolution, the head
  once on all crops, DINO's per-parameter gradient clipping, AdamW, foreach EMA);
- lightly: torchvision ResNet-18 + `lightly.models.modules.DINOProjectionHead` + `lightly.loss.DINOLoss`,
  student and teacher updated with `lightly.models.utils.update_momentum`, AdamW, in the loop of lightly's
  DINO example: one backbone and head forward per crop;
- official (the main column): the step of facebookresearch/dino's main_dino.py, rebuilt (see `Official`).

Rounds alternate A/B (and the order within a round) so drift on a shared machine hits both sides alike;
the table reports the median over rounds. `--profile` adds our per-phase times (the engine's PhaseTimer).
All sides run in one process and so under one host allocator policy (`--host-allocator`, default the
trainer's `retain`): it changes how memory is obtained, not the step, and both steps gain from it alike.

    python benchmarks/trainer_step.py                  # both cases, default rounds
    python benchmarks/trainer_step.py --cases a --rounds 3 --steps 2 --profile
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer import TrainConfig  # noqa: E402
from trainer.allocator import set_host_allocator  # noqa: E402
from trainer.engine import Run  # noqa: E402
from trainer.events import PHASES  # noqa: E402
from trainer.measure import cpu_model  # noqa: E402
from trainer.table import format_table  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    global_crops: int
    local_crops: int
    out_dim: int
    hidden_dim: int
    batch: int = 64
    global_size: int = 32
    local_size: int = 16


CASES = {
    "a": Case("a: 2+6 crops, K=65536, hidden 2048", 2, 6, 65536, 2048),
    "b": Case("b: 2+2 crops, K=32768, hidden 1536", 2, 2, 32768, 1536),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_views(case: Case, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sizes = [case.global_size] * case.global_crops + [case.local_size] * case.local_crops
    return [torch.randn(case.batch, 3, s, s, generator=g).to(device) for s in sizes]


class Ours:
    """The engine's own step on pre-made crops."""

    def __init__(self, case: Case, device: str, views: list[torch.Tensor]):
        cfg = TrainConfig().with_overrides({
            "data.dataset": "synthetic", "data.synthetic_size": 2 * case.batch, "data.image_size": case.global_size,
            "crops.global_crops": case.global_crops, "crops.local_crops": case.local_crops,
            "crops.global_size": case.global_size, "crops.local_size": case.local_size,
            "model.backbone": "resnet18", "model.head.out_dim": case.out_dim, "model.head.hidden_dim": case.hidden_dim,
            "optim.batch_size": case.batch, "optim.freeze_last_layer_epochs": 0.0, "optim.warmup_epochs": 0.0,
            "system.device": device, "system.precision": "fp32", "budget.steps": 100_000,
        })
        self.run = Run(cfg, None, None)
        self.run.build()
        self.run.multicrop = lambda images, generator: views  # pre-made crops: no augmentation cost
        self.images_per_step = case.batch

    def step(self) -> float:
        loss = self.run.train_step(repeat(None))
        self.run.step += 1
        return loss


class Official:
    """The official recipe's step (facebookresearch/dino, main_dino.py), rebuilt from its description here.

    What it does per step, as that code does it: a multi-crop wrapper that runs the backbone once per
    resolution and the head once on all features; a head whose last layer uses the hook-based
    `nn.utils.weight_norm` with the gain frozen at 1; the loss as a loop over (teacher view, student view)
    pairs, each pair taking its own log-softmax of the student's view; `zero_grad`, `backward`, per-parameter
    gradient clipping in a Python loop (a norm, `.item()`, and a multiply where the coefficient is below 1);
    AdamW over two parameter groups (no weight decay on biases and norms); the teacher's EMA as a Python
    loop of `mul_` and `add_` per parameter; the loss read back with `.item()`.
    """

    def __init__(self, case: Case, device: torch.device, views: list[torch.Tensor]):
        import torch.nn as nn
        import torchvision

        class Head(nn.Module):
            def __init__(self):
                super().__init__()
                self.mlp = nn.Sequential(nn.Linear(512, case.hidden_dim), nn.GELU(), nn.Linear(case.hidden_dim, case.hidden_dim),
                                         nn.GELU(), nn.Linear(case.hidden_dim, 256))
                with warnings.catch_warnings():  # the official head uses the deprecated hook-based weight_norm
                    warnings.simplefilter("ignore")
                    self.last_layer = nn.utils.weight_norm(nn.Linear(256, case.out_dim, bias=False))
                self.last_layer.weight_g.data.fill_(1)
                self.last_layer.weight_g.requires_grad = False

            def forward(self, x):
                return self.last_layer(nn.functional.normalize(self.mlp(x), dim=-1, p=2))

        class Wrapper(nn.Module):
            def __init__(self, backbone, head):
                super().__init__()
                backbone.fc = nn.Identity()
                self.backbone, self.head = backbone, head

            def forward(self, x):
                sizes = torch.tensor([v.shape[-1] for v in x])
                ends = torch.cumsum(torch.unique_consecutive(sizes, return_counts=True)[1], 0)
                start, out = 0, torch.empty(0).to(x[0].device)
                for end in ends:
                    out = torch.cat((out, self.backbone(torch.cat(x[start:end]))))
                    start = end
                return self.head(out)

        torch.manual_seed(0)
        self.student = Wrapper(torchvision.models.resnet18(weights=None), Head()).to(device)
        self.teacher = Wrapper(torchvision.models.resnet18(weights=None), Head()).to(device)
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad = False
        regularized = [p for n, p in self.student.named_parameters() if p.requires_grad and not (n.endswith(".bias") or p.ndim == 1)]
        plain = [p for n, p in self.student.named_parameters() if p.requires_grad and (n.endswith(".bias") or p.ndim == 1)]
        self.optimizer = torch.optim.AdamW([{"params": regularized}, {"params": plain, "weight_decay": 0.0}])
        self.lr, self.wd, self.m, self.clip = 5e-4 * case.batch / 256, 0.04, 0.996, 3.0
        self.center = torch.zeros(1, case.out_dim, device=device)
        self.views, self.n_global, self.n_views = views, case.global_crops, len(views)
        self.images_per_step = case.batch

    def loss(self, student_output, teacher_output):
        student_out = (student_output / 0.1).chunk(self.n_views)
        teacher_out = torch.softmax((teacher_output - self.center) / 0.04, dim=-1).detach().chunk(self.n_global)
        total, terms = 0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(self.n_views):
                if v != iq:
                    total += torch.sum(-q * torch.log_softmax(student_out[v], dim=-1), dim=-1).mean()
                    terms += 1
        total /= terms
        with torch.no_grad():
            batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
            self.center = self.center * 0.9 + batch_center * 0.1
        return total

    def step(self) -> float:
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = self.lr
            if i == 0:
                group["weight_decay"] = self.wd
        teacher_output = self.teacher(self.views[: self.n_global])
        student_output = self.student(self.views)
        loss = self.loss(student_output, teacher_output)
        loss.item()  # the official step checks math.isfinite(loss.item()) here
        self.optimizer.zero_grad()
        loss.backward()
        for p in self.student.parameters():
            if p.grad is not None:
                norm = p.grad.data.norm(2)
                norm.item()  # the official clip_gradients collects every norm as a Python float
                coef = self.clip / (norm + 1e-6)
                if coef < 1:
                    p.grad.data.mul_(coef)
        self.optimizer.step()
        with torch.no_grad():
            for q, k in zip(self.student.parameters(), self.teacher.parameters()):
                k.data.mul_(self.m).add_((1 - self.m) * q.detach().data)
        return loss.item()


class Lightly:
    """lightly's modules in the loop of its DINO example (one forward per crop)."""

    def __init__(self, case: Case, device: torch.device, views: list[torch.Tensor]):
        import torchvision
        from lightly.loss import DINOLoss
        from lightly.models.modules import DINOProjectionHead
        from lightly.models.utils import update_momentum

        def head():
            with warnings.catch_warnings():  # lightly uses the deprecated nn.utils.weight_norm
                warnings.simplefilter("ignore")
                return DINOProjectionHead(512, case.hidden_dim, 256, case.out_dim)

        torch.manual_seed(0)
        backbone = torchvision.models.resnet18(weights=None)
        backbone.fc = torch.nn.Identity()
        self.student_backbone, self.student_head = backbone.to(device), head().to(device)
        self.teacher_backbone = torchvision.models.resnet18(weights=None)
        self.teacher_backbone.fc = torch.nn.Identity()
        self.teacher_backbone.load_state_dict(backbone.state_dict())
        self.teacher_head = head()
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        self.teacher_backbone.to(device), self.teacher_head.to(device)
        for p in list(self.teacher_backbone.parameters()) + list(self.teacher_head.parameters()):
            p.requires_grad = False
        self.criterion = DINOLoss(case.out_dim, warmup_teacher_temp_epochs=0).to(device)
        params = [p for m in (self.student_backbone, self.student_head) for p in m.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=5e-4 * case.batch / 256, weight_decay=0.04)
        self.update_momentum = update_momentum
        self.views, self.n_global = views, case.global_crops
        self.images_per_step = case.batch

    def step(self) -> float:
        self.update_momentum(self.student_backbone, self.teacher_backbone, m=0.996)
        self.update_momentum(self.student_head, self.teacher_head, m=0.996)
        with torch.no_grad():
            teacher_out = [self.teacher_head(self.teacher_backbone(v)) for v in self.views[: self.n_global]]
        student_out = [self.student_head(self.student_backbone(v)) for v in self.views]
        loss = self.criterion(teacher_out, student_out, epoch=0)
        loss.backward()
        self.student_head.cancel_last_layer_gradients(current_epoch=0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.item()


def time_steps(impl, steps: int, device: torch.device) -> float:
    """Images per second over `steps` steps."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        impl.step()
    _sync(device)
    return steps * impl.images_per_step / (time.perf_counter() - t0)


def bench_case(case: Case, device: torch.device, rounds: int, steps: int, warmup: int, profile: bool,
               torch_profile: bool = False) -> dict:
    views = make_views(case, device)
    impls = {"ours": Ours(case, device.type, views), "official": Official(case, device, views)}
    try:
        impls["lightly"] = Lightly(case, device, views)
    except ImportError:  # lightly is in the dev extra; without it the column is left empty
        print("  lightly is not installed: its column stays empty", flush=True)
    ours_n = sum(p.numel() for p in impls["ours"].run.student.parameters())
    official_n = sum(p.numel() for p in impls["official"].student.parameters())
    assert ours_n == official_n, f"not the same model: {ours_n} vs {official_n} student parameters"
    if "lightly" in impls:
        lightly_n = sum(p.numel() for m in (impls["lightly"].student_backbone, impls["lightly"].student_head)
                        for p in m.parameters())
        assert lightly_n == ours_n, f"not the same model: {ours_n} vs {lightly_n} (lightly) student parameters"
    for impl in impls.values():
        for _ in range(warmup):
            impl.step()
    rates: dict[str, list[float]] = {name: [] for name in impls}
    for r in range(rounds):
        order = list(impls)[r % len(impls):] + list(impls)[:r % len(impls)]  # each side first in turn
        for name in order:
            rates[name].append(time_steps(impls[name], steps, device))
    result = {name: statistics.median(v) for name, v in rates.items()}
    result["rounds"] = rates
    if torch_profile:
        from torch.profiler import ProfilerActivity, profile as torch_profiler

        result["torch_profile"] = {}
        for name in ("ours", "official"):
            with torch_profiler(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    impls[name].step()
            result["torch_profile"][name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
    if profile:
        run = impls["ours"].run
        run.timer.reset()
        run.timer.enabled = True
        for _ in range(steps):
            impls["ours"].step()
        run.timer.enabled = False
        result["phases_ms"] = run.timer.per_step_ms(steps)
    del impls
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="a,b", help="comma-separated: a (2+6, K=65536), b (2+2, K=32768)")
    p.add_argument("--rounds", type=int, default=4, help="alternating A/B rounds")
    p.add_argument("--steps", type=int, default=2, help="timed steps per implementation per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per implementation first")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads on the CPU (0: torch's default)")
    p.add_argument("--host-allocator", default="retain", choices=["retain", "system"],
                   help="glibc's policy for large blocks, for this whole process, so all sides alike (trainer.allocator; "
                   "default: the trainer's)")
    p.add_argument("--profile", action="store_true", help="also print our per-phase ms per step")
    p.add_argument("--torch-profile", action="store_true", help="also print torch.profiler's top operators, ours and official")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = set_host_allocator(args.host_allocator)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda" else
             f"CPU ({cpu_model()}), {torch.get_num_threads()} threads, host allocator {allocator}")
    print(f"ResNet-18, batch 64, 32 px global / 16 px local crops, fp32, AdamW; {where}; "
          f"{args.rounds} rounds x {args.steps} steps, median over rounds", flush=True)
    rows, profiles = [], []
    for key in args.cases.split(","):
        case = CASES[key.strip()]
        t0 = time.perf_counter()
        res = bench_case(case, device, args.rounds, args.steps, args.warmup, args.profile, args.torch_profile)
        for name, text in res.get("torch_profile", {}).items():
            print(f"torch.profiler, {name}, {case.name}, {args.steps} steps:\n{text}", flush=True)
        spread = lambda v: (max(v) - min(v)) / statistics.median(v)  # noqa: E731
        ratio = [o / f for o, f in zip(res["rounds"]["ours"], res["rounds"]["official"])]
        rows.append((case.name, res["ours"], res["official"], f"{res['ours'] / res['official']:.2f}x",
                     f"{min(ratio):.2f}-{max(ratio):.2f}", res.get("lightly", ""),
                     f"{res['ours'] / res['lightly']:.2f}x" if "lightly" in res else "",
                     f"{100 * spread(res['rounds']['ours']):.0f}% / {100 * spread(res['rounds']['official']):.0f}%",
                     f"{time.perf_counter() - t0:.0f}"))
        if "phases_ms" in res:
            profiles.append((case.name, res["phases_ms"]))
        print(f"  done {case.name}", flush=True)
    print()
    print(format_table(["case", "ours img/s", "official img/s", "ours/official", "per round", "lightly img/s",
                        "ours/lightly", "spread ours/official", "case s"], rows))
    for name, phases in profiles:
        total = sum(phases.values())
        print()
        print(f"ours, per phase ({name}):")
        print(format_table(["phase", "ms/step", "share"],
                           [(ph, phases[ph], f"{100 * phases[ph] / total:.1f}%") for ph in PHASES]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
