"""kNN of both backbones at every evaluation, and BatchNorm statistics that do not decide the number.

An EMA teacher barely moves in a short trial, so the student's kNN is reported beside it; `eval.bn_stats:
precise` recomputes BatchNorm statistics on plain training images, on a copy, before each kNN.
"""

from __future__ import annotations

import copy

import pytest
import torch

from trainer import train
from trainer.engine import Run, precise_bn_copy
from trainer.knn import extract_features, weighted_knn

from trainer_tiny import one_thread, tiny_config  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def _knn_of(run: Run, backbone) -> tuple[float, float]:
    """kNN straight from the building blocks, independent of `Run.evaluate`."""
    view = lambda batch: run.multicrop.plain(batch, run.cfg.crops.global_size)  # noqa: E731
    bank = extract_features(backbone, run.splits.train, view, 64)
    queries = extract_features(backbone, run.splits.val, view, 64)
    return weighted_knn(bank, run.splits.train_labels, queries, run.splits.val_labels,
                        run.cfg.eval.knn_k, run.cfg.eval.knn_temperature, run.splits.num_classes)


def _built(**overrides) -> Run:
    run = Run(tiny_config(**overrides), None, None)
    run.build()
    return run


def test_summary_and_eval_events_carry_the_students_kNN_and_it_is_the_students_own(tmp_path):
    events = []
    # lr x100 for a few steps moves the student well away from its EMA teacher
    cfg = tiny_config(optim__lr=0.05, optim__warmup_epochs=0, eval__every_steps=3)
    result = train(cfg, callback=lambda e, p: events.append((e, p)) and None, out_dir=tmp_path)
    s = result.summary
    evals = [p for e, p in events if e == "eval"]
    assert [e["step"] for e in evals] == [0, 3, 6]
    for key in ("knn_top1", "knn_top5", "student_knn_top1", "student_knn_top5", "eval_s"):
        assert all(isinstance(e[key], float) for e in evals), key
    # before training the two backbones are the same weights
    assert s["student_knn_top1_initial"] == s["knn_top1_initial"] and s["student_knn_top5_initial"] == s["knn_top5_initial"]
    assert (s["student_knn_top1"], s["student_knn_top5"]) == (evals[-1]["student_knn_top1"], evals[-1]["student_knn_top5"])
    # the final numbers are those of the checkpoint's student and teacher backbones, computed independently
    run = _built(optim__lr=0.05, optim__warmup_epochs=0, eval__every_steps=3)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    run.student.load_state_dict(state["student"])
    run.teacher.load_state_dict(state["teacher"])
    assert _knn_of(run, run.student.backbone) == (s["student_knn_top1"], s["student_knn_top5"])
    assert _knn_of(run, run.teacher.backbone) == (s["knn_top1"], s["knn_top5"])
    assert not torch.equal(state["student"]["backbone.net.conv1.weight"], state["teacher"]["backbone.net.conv1.weight"])


def test_precise_bn_statistics_are_the_mean_and_variance_of_the_plain_training_images():
    run = _built()
    backbone = run.teacher.backbone
    view = lambda batch: run.multicrop.plain(batch, run.cfg.crops.global_size)  # noqa: E731
    precise = precise_bn_copy(backbone, run.splits.train, view, n_images=32, batch_size=32)  # one batch: exact moments
    with torch.no_grad():
        x = backbone.net.conv1(view(run.splits.train.__getitems__(list(range(32)))))
    torch.testing.assert_close(precise.net.bn1.running_mean, x.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(precise.net.bn1.running_var, x.var(dim=(0, 2, 3), unbiased=True))
    # the live backbone keeps its placeholder statistics (mean 0, var 1) and its mode
    assert torch.equal(backbone.net.bn1.running_mean, torch.zeros(16)) and torch.equal(backbone.net.bn1.running_var, torch.ones(16))
    assert not precise.training and precise is not backbone


def test_precise_kNN_does_not_depend_on_the_running_statistics_and_leaves_them_alone():
    running, precise = _built(), _built(eval__bn_stats="precise")
    before_running, before_precise = running.knn(running.teacher.backbone), precise.knn(precise.teacher.backbone)
    g = torch.Generator().manual_seed(3)
    for run in (running, precise):  # running statistics as a few training steps might leave them
        for m in run.teacher.backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 4 + 0.1)
    saved = [b.clone() for b in precise.teacher.buffers()]
    assert precise.knn(precise.teacher.backbone) == before_precise
    assert running.knn(running.teacher.backbone) != before_running
    assert all(torch.equal(a, b) for a, b in zip(saved, precise.teacher.buffers()))


def test_precise_statistics_do_not_change_what_training_computes(tmp_path):
    results = {}
    for bn in ("running", "precise"):
        out = tmp_path / bn
        results[bn] = train(tiny_config(eval__bn_stats=bn, eval__every_steps=2), out_dir=out)
        results[bn].state = torch.load(out / "checkpoint.pt", weights_only=False)
    a, b = results["running"], results["precise"]
    assert a.losses == b.losses and a.summary["bn_stats"] == "running" and b.summary["bn_stats"] == "precise"
    for which in ("student", "teacher"):
        assert all(torch.equal(v, b.state[which][k]) for k, v in a.state[which].items()), which


def test_precise_statistics_of_a_SyncBatchNorm_backbone_are_computed_on_a_plain_BatchNorm_copy():
    # DDP on GPUs converts the student's BatchNorm to SyncBatchNorm; only rank 0 evaluates, so the copy must not sync.
    run = _built()
    plain = run.teacher.backbone
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    view = lambda batch: run.multicrop.plain(batch, run.cfg.crops.global_size)  # noqa: E731
    a = precise_bn_copy(plain, run.splits.train, view, n_images=48, batch_size=16)
    b = precise_bn_copy(synced, run.splits.train, view, n_images=48, batch_size=16)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in b.modules())
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())  # the original is left as it was
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, msg=name)
