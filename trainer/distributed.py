"""BatchNorm under torchrun, as DINO does it: the teacher's statistics are synchronized like the student's.

DINO converts both networks with `nn.SyncBatchNorm.convert_sync_batchnorm`, so the teacher normalizes
with the global batch's statistics and every rank keeps the same running statistics (which the kNN
evaluation and the checkpoint then use). Two details make that need more than one call here:

- The teacher is also run outside training steps, on rank 0 alone (view agreement, in train mode). A
  SyncBatchNorm there would wait for a collective the other ranks never join. So training steps run a
  *synchronized view* of the teacher (`sync_batchnorm_view`): the same parameters and buffers, with
  SyncBatchNorm layers, while the teacher module itself keeps plain BatchNorm.
- torch's SyncBatchNorm runs only on GPUs. On CPU (gloo) each rank normalizes with its own batch, and
  the teacher's running statistics are averaged across ranks after each step
  (`average_batchnorm_statistics`). For the running means this is exactly what SyncBatchNorm keeps (an
  EMA is linear and the ranks' batches are equal in size); the running variances lack the part that
  comes from the spread between the ranks' batch means.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def sync_batchnorm_view(module: nn.Module) -> nn.Module:
    """A copy of `module` that shares every parameter and buffer with it, its BatchNorm layers as SyncBatchNorm."""
    shared = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(module, shared))


@torch.no_grad()
def average_batchnorm_statistics(module: nn.Module) -> None:
    """Replace each BatchNorm running mean and variance in `module` by its mean over all ranks (one all-reduce)."""
    buffers = [b for m in module.modules() if isinstance(m, _BATCHNORMS)
               for b in (m.running_mean, m.running_var) if b is not None]
    if not buffers or not dist.is_initialized() or dist.get_world_size() < 2:
        return
    flat = torch.cat([b.reshape(-1) for b in buffers])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for b in buffers:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()
