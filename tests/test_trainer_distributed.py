"""Two processes under torchrun on the CPU (gloo): the command works, rank 0 alone reports, and the two
ranks stay one model: the same teacher (DDP averaged the gradients) and the same all-reduced center.

Why the center check is real: each rank sees a different shard of the data, so the EMA of a rank's own
teacher batch means (`local_center`, kept by the probe) differs between ranks. With the all-reduce, the
center is the EMA of the global batch mean, which (equal batch sizes, linear EMA) is exactly the mean of
the two local-only centers, and it is the same on both ranks.

The teacher's BatchNorm statistics follow the same logic: each rank's teacher normalizes its own shard,
so its running statistics differ between ranks before they are synchronized (as DINO's SyncBatchNorm
teacher keeps them), and are one set after.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer_tiny import single_thread_env, tiny_config

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
TESTS = Path(__file__).resolve().parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable"),
]


def _config(tmp_path: Path) -> Path:
    # 128 images: 102 training images, 2 ranks x 16 = 32 per step, 3 steps per epoch.
    cfg = tiny_config(data__synthetic_size=128, budget__steps=4, eval__at_start=False)
    return cfg.save(tmp_path / "tiny.yaml")


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(TORCHRUN + args, cwd=cwd, env=single_thread_env(), capture_output=True, text=True, timeout=300)


def test_torchrun_two_ranks_on_cpu_trains_and_only_rank_0_reports(tmp_path):
    out = tmp_path / "run"
    proc = _torchrun(["-m", "trainer", "train", str(_config(tmp_path)), "--out", str(out), "--quiet"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "ok" and s["world_size"] == 2 and s["steps"] == 4
    assert s["images_per_step"] == 32 and s["throughput_img_s"] > 0 and 0 <= s["knn_top1"] <= 100
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.yaml", "log.jsonl", "summary.json"]
    assert proc.stdout.count("summary: ") == 1  # one report, from rank 0
    assert proc.stderr.count("training -> ") == 1


def test_torchrun_ranks_share_teacher_and_all_reduced_center(tmp_path):
    out = tmp_path / "run"
    proc = _torchrun([str(TESTS / "trainer_dist_probe.py"), "train", str(_config(tmp_path)), "--out", str(out),
                      "--quiet"], cwd=TESTS.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(out / f"probe_rank{r}.pt", weights_only=False) for r in (0, 1))
    assert (r0["rank"], r1["rank"], r0["world"], r0["step"], r1["step"]) == (0, 1, 2, 4, 4)
    # Different shards: without the all-reduce the centers would differ.
    assert (r0["local_center"] - r1["local_center"]).abs().max() > 1e-4
    # With it, they are one center, the mean of the local ones.
    assert torch.equal(r0["center"], r1["center"])
    torch.testing.assert_close(r0["center"], (r0["local_center"] + r1["local_center"]) / 2, rtol=0, atol=1e-6)
    # DDP averaged the gradients, so the students and their EMA teachers are identical.
    differ = [(i, (a - b).abs().max().item()) for i, (a, b) in enumerate(zip(r0["teacher"], r1["teacher"]))
              if not torch.equal(a, b)]
    assert not differ, f"teacher parameters (index, max diff) differ between ranks: {differ[:8]}"
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    assert torch.equal(saved["center"], r0["center"])


def test_torchrun_teacher_batchnorm_statistics_are_the_same_on_both_ranks(tmp_path):
    out = tmp_path / "run"
    proc = _torchrun([str(TESTS / "trainer_dist_probe.py"), "train", str(_config(tmp_path)), "--out", str(out),
                      "--quiet"], cwd=TESTS.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(out / f"probe_rank{r}.pt", weights_only=False) for r in (0, 1))
    names = sorted(r0["teacher_bn"])
    assert len(names) == 2 * 20  # ResNet-18: 20 BatchNorm layers, a running mean and variance each
    # Before the last step's synchronization, the ranks' statistics differed (each saw its own shard) ...
    before0, before1 = r0["teacher_bn_before_average"], r1["teacher_bn_before_average"]
    assert sorted(before0) == names
    assert max((before0[n] - before1[n]).abs().max().item() for n in names) > 1e-4
    # ... after it, they are one set: the mean of the two.
    differ = [n for n in names if not torch.equal(r0["teacher_bn"][n], r1["teacher_bn"][n])]
    assert not differ, f"teacher BatchNorm buffers differ between ranks: {differ[:5]}"
    for n in names:
        torch.testing.assert_close(r0["teacher_bn"][n], (before0[n] + before1[n]) / 2, rtol=0, atol=1e-6)
    # The checkpoint (and so a kNN evaluation of it) holds those statistics.
    saved = torch.load(out / "checkpoint.pt", weights_only=False)["teacher"]
    assert all(torch.equal(saved[n], r0["teacher_bn"][n]) for n in names)


def test_sync_batchnorm_view_shares_every_tensor_and_leaves_the_teacher_plain():
    from torch import nn

    from trainer.distributed import sync_batchnorm_view
    from trainer.model import DINOHead, MultiCropWrapper, build_backbone

    cfg = tiny_config(model__head__use_bn=True)
    backbone, dim = build_backbone(cfg.model, cfg.crops.global_size)
    teacher = MultiCropWrapper(backbone, DINOHead(dim, cfg.model.head))
    view = sync_batchnorm_view(teacher)
    plain = [m for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    synced = [m for m in view.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert len(plain) == len(synced) == 20 + 2  # ResNet-18's 20 and the head's 2 (use_bn)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in teacher.modules())
    ours = dict(teacher.named_parameters()) | dict(teacher.named_buffers())
    theirs = dict(view.named_parameters()) | dict(view.named_buffers())
    assert ours.keys() == theirs.keys() and all(ours[k] is theirs[k] for k in ours)
    with torch.no_grad():  # an EMA step on the teacher is a step on the view
        next(teacher.parameters()).add_(1.0)
    assert torch.equal(next(teacher.parameters()), next(view.parameters()))
