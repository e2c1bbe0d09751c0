"""The DINO loss: the student matches the teacher's centered, sharpened distribution over prototypes."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def student_views(pairing: str, n_global: int, n_views: int) -> list[int]:
    """The student views each teacher global view is compared with (the same view itself is always skipped).

    standard: every view (DINO's paper); globals_only: the global views only; global_to_local: the local
    views only (the teacher's global context must be predicted from small crops).
    """
    if pairing == "globals_only":
        return list(range(n_global))
    if pairing == "global_to_local":
        return list(range(n_global, n_views))
    return list(range(n_views))


def view_pairs(pairing: str, n_global: int, n_views: int) -> list[tuple[int, int]]:
    """(teacher view, student view) pairs the loss averages over."""
    return [(t, s) for t in range(n_global) for s in student_views(pairing, n_global, n_views) if s != t]


class DINOLoss(nn.Module):
    """Cross-entropy H(P_teacher, P_student) summed over view pairs, with an EMA center on the teacher.

    `forward(student_out, teacher_out, step)`: `student_out` is `[n_views * B, K]` (globals first),
    `teacher_out` is `[n_global * B, K]`. The teacher is sharpened with a temperature that warms up
    linearly over `warmup_steps` and centered with `center` (EMA of the teacher's batch mean, all-reduced
    across ranks), which together keep the teacher from collapsing to one prototype or to uniform.

    The pair sum is computed without a Python loop over pairs: with q_t the teacher probabilities and
    l_s the student log-probabilities, sum over pairs (t, s) of q_t . l_s equals
    (sum_t q_t) . (sum_s l_s) minus the excluded diagonal terms, which costs one product per view rather
    than one per pair (14 pairs at 2+6 crops).
    """

    def __init__(self, out_dim: int, n_global: int, n_views: int, student_temp: float, teacher_temp: float,
                 warmup_teacher_temp: float, warmup_steps: int, total_steps: int, center_momentum: float,
                 pairing: str = "standard"):
        super().__init__()
        self.n_global, self.n_views = n_global, n_views
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.pairs = view_pairs(pairing, n_global, n_views)
        self.students = student_views(pairing, n_global, n_views)
        assert self.students == list(range(self.students[0], self.students[-1] + 1)) if self.students else True
        if not self.pairs:
            raise ValueError(f"loss.pairing={pairing!r} with {n_global} global and {n_views - n_global} local crops has no view pairs")
        warm = np.linspace(warmup_teacher_temp, teacher_temp, warmup_steps) if warmup_steps > 0 else np.array([])
        rest = np.full(max(0, total_steps - len(warm)), teacher_temp)
        self.teacher_temps = np.concatenate([warm, rest, [teacher_temp]])
        self.register_buffer("center", torch.zeros(1, out_dim))
        # Collapse monitor (DINO paper, section 5.3): set `track_entropy` before a step to have that step's
        # teacher entropies in `entropy` (nats): "teacher" is the mean per-image entropy (ln K: uniform,
        # the plateau where the teacher says nothing about the image; 0: one-hot), "batch" the entropy of
        # the batch-mean distribution (near 0: every image on the same prototype).
        self.track_entropy = False
        self.entropy: dict[str, float] = {}

    def teacher_temp(self, step: int) -> float:
        return float(self.teacher_temps[min(step, len(self.teacher_temps) - 1)])

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, step: int) -> torch.Tensor:
        # Softmax over tens of thousands of prototypes needs at least fp32: upcast bf16/fp16, never downcast.
        dtype = torch.promote_types(student_out.dtype, torch.float32)
        student_out, teacher_out = student_out.to(dtype), teacher_out.to(dtype)
        logp_all = F.log_softmax(student_out / self.student_temp, dim=-1)
        logp = logp_all.chunk(self.n_views)
        q_all = F.softmax((teacher_out - self.center) / self.teacher_temp(step), dim=-1).detach()
        if self.track_entropy:
            self.entropy = teacher_entropies(q_all)
        q = q_all.chunk(self.n_global)
        # Sums over views as views of one tensor [views, B, K] (the same sums as stacking the chunks, no copy);
        # every pairing's student views are consecutive.
        b, first, last = q[0].shape[0], self.students[0], self.students[-1] + 1
        q_sum = q_all.view(self.n_global, b, -1).sum(0)
        l_sum = logp_all[first * b:last * b].view(last - first, b, -1).sum(0)
        total = (q_sum * l_sum).sum(-1)
        for t in range(self.n_global):
            if t in self.students:
                total = total - (q[t] * logp[t]).sum(-1)
        loss = -total.mean() / len(self.pairs)
        self.update_center(teacher_out)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        batch_center = teacher_out.sum(dim=0, keepdim=True)
        count = teacher_out.shape[0]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            count *= dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(batch_center / count, alpha=1 - self.center_momentum)


@torch.no_grad()
def teacher_entropies(q: torch.Tensor) -> dict[str, float]:
    """Mean per-row entropy of the distributions `q` `[N, K]`, and the entropy of their mean, in nats."""
    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)

    return {"teacher": entropy(q).mean().item(), "batch": entropy(q.mean(0)).item()}


@torch.no_grad()
def view_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """How much of the across-image variation of outputs `a` `[N, D]` two views share, in [-1, 1].

    `a[i]` and `b[i]` are one model's outputs for two augmented views of image i. Both are centered
    over the images (as DINO's center does to the teacher) and correlated: sum(a.b) / sqrt(sum(a.a)
    sum(b.b)). 1: the views give the same output, so a student can predict the teacher's target from the
    other view; 0: what tells one image from another in one view says nothing about the other view, and
    the best a student can do is a flat distribution (DINO's uniform plateau).
    """
    a, b = a.float(), b.float()
    a, b = a - a.mean(0), b - b.mean(0)
    return float((a * b).sum() / ((a * a).sum() * (b * b).sum()).sqrt().clamp_min(1e-30))


def collapse_note(teacher: float | None, batch: float | None, max_entropy: float) -> str | None:
    """A one-line reading of the teacher entropies when they show one of DINO's two collapses, else None.

    Uniform: every image's teacher distribution is near uniform (per-image entropy >= 95% of ln K), the
    plateau at the start of DINO training where the loss sits at ln K. One prototype: the batch-mean
    distribution is near one-hot (its entropy <= 5% of ln K), so every image gets the same target.
    """
    if teacher is None or batch is None:
        return None
    if teacher >= 0.95 * max_entropy:
        return (f"teacher entropy {teacher:.2f} of ln K = {max_entropy:.2f}: uniform collapse "
                "(DINO's early plateau; the targets do not yet tell images apart)")
    if batch <= 0.05 * max_entropy:
        return f"batch-mean teacher entropy {batch:.2f} of ln K = {max_entropy:.2f}: collapse onto one prototype"
    return None
