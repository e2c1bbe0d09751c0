"""The collapse monitor: the teacher entropies that tell DINO's uniform plateau and one-prototype
collapse apart from a teacher that assigns images to prototypes, and the view agreement that says how
much of the teacher's output two views of one image share."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.engine import Run
from trainer.loss import DINOLoss, collapse_note, teacher_entropies, view_agreement

from trainer_tiny import tiny_config

K = 64


def test_entropies_of_uniform_one_hot_and_spread_distributions():
    uniform = teacher_entropies(torch.full((8, K), 1.0 / K))
    assert uniform["teacher"] == pytest.approx(math.log(K)) and uniform["batch"] == pytest.approx(math.log(K))
    same = teacher_entropies(torch.nn.functional.one_hot(torch.zeros(8, dtype=torch.long), K).float())
    assert same["teacher"] == pytest.approx(0.0, abs=1e-6) and same["batch"] == pytest.approx(0.0, abs=1e-6)
    spread = teacher_entropies(torch.eye(K))  # each image confidently on its own prototype
    assert spread["teacher"] == pytest.approx(0.0, abs=1e-6) and spread["batch"] == pytest.approx(math.log(K))


def _loss(track: bool) -> DINOLoss:
    loss = DINOLoss(K, n_global=2, n_views=2, student_temp=0.1, teacher_temp=0.04, warmup_teacher_temp=0.04,
                    warmup_steps=0, total_steps=10, center_momentum=0.9)
    loss.track_entropy = track
    return loss


def test_dino_loss_reports_uniform_collapse_when_the_teacher_ignores_the_image():
    loss = _loss(track=True)
    same_for_all = torch.randn(1, K).expand(2 * 8, K)  # every image gives the same teacher output
    loss.center.copy_(same_for_all[:1])  # ... which the center has learned to subtract
    loss(torch.randn(2 * 8, K), same_for_all, step=0)
    assert loss.entropy["teacher"] == pytest.approx(math.log(K), rel=1e-5)
    assert "uniform collapse" in collapse_note(loss.entropy["teacher"], loss.entropy["batch"], math.log(K))


def test_dino_loss_reports_a_confident_teacher_that_tells_images_apart():
    loss = _loss(track=True)
    teacher = torch.eye(K)[:16] * 2.0  # sharp, and on a different prototype per image
    loss(torch.randn(16, K), teacher, step=0)
    assert loss.entropy["teacher"] < 0.1 * math.log(K) and loss.entropy["batch"] > 0.5 * math.log(K)
    assert collapse_note(loss.entropy["teacher"], loss.entropy["batch"], math.log(K)) is None
    single = torch.zeros(16, K)
    single[:, 3] = 2.0  # sharp, but every image on prototype 3
    loss(torch.randn(16, K), single, step=0)
    assert "one prototype" in collapse_note(loss.entropy["teacher"], loss.entropy["batch"], math.log(K))


def test_entropy_is_computed_only_when_asked():
    loss = _loss(track=False)
    loss(torch.randn(16, K), torch.randn(16, K), step=0)
    assert loss.entropy == {}


def test_view_agreement_of_identical_opposite_shifted_and_unrelated_views():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(512, 32, generator=g)
    assert view_agreement(a, a) == pytest.approx(1.0)
    assert view_agreement(a, -a) == pytest.approx(-1.0)
    assert view_agreement(a, a + torch.randn(1, 32, generator=g) * 10) == pytest.approx(1.0)  # a shared offset is centered away
    assert abs(view_agreement(a, torch.randn(512, 32, generator=g))) < 0.05
    half = a + torch.randn(512, 32, generator=g)  # as much view-specific variation as shared: 1/2
    assert view_agreement(a, half) == pytest.approx(1 / math.sqrt(2), abs=0.05)


def test_run_view_agreement_leaves_the_teacher_untouched_and_is_repeatable():
    run = Run(tiny_config(), None, None)
    run.build()
    before = [b.clone() for b in run.teacher.buffers()]
    mode = run.teacher.training
    first = run.view_agreement(n=32)
    assert -1.0 <= first <= 1.0
    assert run.view_agreement(n=32) == first  # fixed views, same weights: the same number
    assert run.teacher.training == mode
    assert all(torch.equal(b, a) for b, a in zip(before, run.teacher.buffers()))  # BatchNorm statistics restored
