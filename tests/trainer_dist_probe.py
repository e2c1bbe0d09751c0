"""Run the `trainer` command under torchrun and leave, per rank, what the distributed test compares.

Used by `test_trainer_distributed.py` as `torchrun ... tests/trainer_dist_probe.py train CONFIG --out DIR`.
It is the real command (`trainer.cli.main`) with two observation hooks, nothing replaced:

- `DINOLoss.update_center` also keeps `local_center`, the EMA of this rank's own batch means (what
  the center would be without the all-reduce);
- `average_batchnorm_statistics`, as the engine calls it after each step's EMA update, also keeps
  the teacher's BatchNorm running statistics as this rank had them before the average;
- `Run.save_checkpoint`, called on every rank at the end of the run, also writes `probe_rank{R}.pt`
  with this rank's center, local-only center, teacher parameters and teacher BatchNorm buffers.
"""

from __future__ import annotations

import os
import sys

import torch

import trainer.engine
from trainer.cli import main
from trainer.engine import Run
from trainer.loss import DINOLoss

_update_center, _save_checkpoint = DINOLoss.update_center, Run.save_checkpoint
_average = trainer.engine.average_batchnorm_statistics
_before_average: dict[str, torch.Tensor] = {}


def _bn_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in module.named_buffers() if n.endswith(("running_mean", "running_var"))}


def average_batchnorm_statistics(module: torch.nn.Module) -> None:
    _before_average.clear()
    _before_average.update(_bn_buffers(module))
    _average(module)


@torch.no_grad()
def update_center(self: DINOLoss, teacher_out: torch.Tensor) -> None:
    if not hasattr(self, "local_center"):
        self.local_center = torch.zeros_like(self.center)
    m = self.center_momentum
    self.local_center.mul_(m).add_(teacher_out.mean(dim=0, keepdim=True), alpha=1 - m)
    _update_center(self, teacher_out)


def save_checkpoint(self: Run, extra) -> None:
    _save_checkpoint(self, extra)
    torch.save({
        "rank": self.dist.rank, "world": self.dist.world, "step": self.step,
        "center": self.dino_loss.center.clone(), "local_center": self.dino_loss.local_center.clone(),
        "teacher": [p.detach().clone() for p in self.teacher.parameters()],
        "teacher_bn": _bn_buffers(self.teacher), "teacher_bn_before_average": dict(_before_average),
    }, self.out_dir / f"probe_rank{self.dist.rank}.pt")


DINOLoss.update_center, Run.save_checkpoint = update_center, save_checkpoint
trainer.engine.average_batchnorm_statistics = average_batchnorm_statistics

if __name__ == "__main__":
    assert os.environ.get("WORLD_SIZE"), "run me under torchrun"
    raise SystemExit(main(sys.argv[1:]))
