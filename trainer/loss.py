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
        if not self.pairs:
            raise ValueError(f"loss.pairing={pairing!r} with {n_global} global and {n_views - n_global} local crops has no view pairs")
        warm = np.linspace(warmup_teacher_temp, teacher_temp, warmup_steps) if warmup_steps > 0 else np.array([])
        rest = np.full(max(0, total_steps - len(warm)), teacher_temp)
        self.teacher_temps = np.concatenate([warm, rest, [teacher_temp]])
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_temp(self, step: int) -> float:
        return float(self.teacher_temps[min(step, len(self.teacher_temps) - 1)])

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, step: int) -> torch.Tensor:
        # Softmax over tens of thousands of prototypes needs at least fp32: upcast bf16/fp16, never downcast.
        dtype = torch.promote_types(student_out.dtype, torch.float32)
        student_out, teacher_out = student_out.to(dtype), teacher_out.to(dtype)
        logp = F.log_softmax(student_out / self.student_temp, dim=-1).chunk(self.n_views)
        q = F.softmax((teacher_out - self.center) / self.teacher_temp(step), dim=-1).detach().chunk(self.n_global)
        q_sum = torch.stack(q).sum(0)
        l_sum = torch.stack([logp[s] for s in self.students]).sum(0)
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
