"""Run the `trainer` command under torchrun and leave, per rank, what the distributed test compares.

Used by `test_trainer_distributed.py` as `torchrun ... tests/trainer_dist_probe.py train CONFIG --out DIR`.
It is the real command (`trainer.cli.main`) with two observation hooks, nothing replaced:

- `DINOLoss.update_center` also keeps `local_center`, the EMA of this rank's own batch means (what
  the center would be without the all-reduce);
- `Run.save_checkpoint`, called on every rank at the end of the run, also writes `probe_rank{R}.pt`
  with this rank's center, local-only center and teacher parameters.
"""

from __future__ import annotations

import os
import sys

import torch

from trainer.cli import main
from trainer.engine import Run
from trainer.loss import DINOLoss

_update_center, _save_checkpoint = DINOLoss.update_center, Run.save_checkpoint


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
    }, self.out_dir / f"probe_rank{self.dist.rank}.pt")


DINOLoss.update_center, Run.save_checkpoint = update_center, save_checkpoint

if __name__ == "__main__":
    assert os.environ.get("WORLD_SIZE"), "run me under torchrun"
    raise SystemExit(main(sys.argv[1:]))
