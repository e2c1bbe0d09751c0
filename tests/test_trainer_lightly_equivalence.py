"""The DINO math checked against an independent implementation, lightly's, to 1e-5.

Loss values and the center over several steps (crop counts, temperatures, teacher-temperature warm-up),
the projection head's forward with copied weights, one full optimizer step of a student/teacher pair
built from our modules against the same pair built from lightly's modules, and finally the engine's own
`Run.train_step` against a lightly-style step (per-view forwards, `DINOLoss`, AdamW, `update_momentum`).

Mapping of the schedules: lightly's `DINOLoss(forward(..., epoch=e))` indexes a `linspace(warmup_temp,
teacher_temp, warmup_teacher_temp_epochs)` by `e`; ours indexes the same `linspace` by optimizer step.
Passing our step as lightly's "epoch" (and our warm-up length in steps as its warm-up epochs) gives the
same temperature at every step.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

from trainer.config import HeadConfig
from trainer.engine import Run
from trainer.loss import DINOLoss
from trainer.model import DINOHead, MultiCropWrapper

from trainer_tiny import one_thread, tiny_config  # noqa: F401  (fixture)

lightly_loss = pytest.importorskip("lightly.loss")
lightly_heads = pytest.importorskip("lightly.models.modules.heads")
from lightly.models.utils import update_momentum  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5


def _lightly_head(in_dim: int, hidden: int, bottleneck: int, out: int, freeze_last_layer: int = -1):
    with warnings.catch_warnings():  # lightly still uses the deprecated nn.utils.weight_norm
        warnings.simplefilter("ignore")
        return lightly_heads.DINOProjectionHead(in_dim, hidden, bottleneck, out, freeze_last_layer=freeze_last_layer)


def _copy_head(ours: DINOHead, theirs) -> None:
    """Copy our head's weights into lightly's: MLP Linear layers in order, then the weight-normed layer (g, v)."""
    ours_linear = [m for m in ours.mlp if isinstance(m, nn.Linear)]
    theirs_linear = [m for m in theirs.layers if isinstance(m, nn.Linear)]
    assert len(ours_linear) == len(theirs_linear) == 3
    with torch.no_grad():
        for a, b in zip(ours_linear, theirs_linear):
            b.weight.copy_(a.weight)
            b.bias.copy_(a.bias)
        wn = ours.last_layer.parametrizations.weight
        theirs.last_layer.weight_g.copy_(wn.original0)
        theirs.last_layer.weight_v.copy_(wn.original1)


def _their_head_params(theirs) -> list[torch.Tensor]:
    """lightly's head parameters in our head's parameter order (mlp weights/biases, then g, v)."""
    linear = [m for m in theirs.layers if isinstance(m, nn.Linear)]
    return [t for m in linear for t in (m.weight, m.bias)] + [theirs.last_layer.weight_g, theirs.last_layer.weight_v]


# ---- the loss and the center -------------------------------------------------------------------

CROPS = [(2, 0), (2, 2), (2, 6)]
TEMPS = [  # (student_temp, teacher_temp, warmup_teacher_temp, warmup_steps)
    (0.1, 0.04, 0.04, 0),
    (0.2, 0.07, 0.07, 0),
    (0.1, 0.07, 0.04, 3),  # warm-up over the first 3 steps, then constant
    (0.2, 0.04, 0.02, 2),
]


@pytest.mark.parametrize("n_global,n_local", CROPS)
@pytest.mark.parametrize("student_temp,teacher_temp,warmup_temp,warmup_steps", TEMPS)
def test_loss_and_center_match_lightly_over_steps(n_global, n_local, student_temp, teacher_temp, warmup_temp, warmup_steps):
    out_dim, batch, steps, momentum = 256, 8, 5, 0.9
    n_views = n_global + n_local
    ours = DINOLoss(out_dim, n_global, n_views, student_temp, teacher_temp, warmup_temp, warmup_steps,
                    total_steps=steps, center_momentum=momentum)
    theirs = lightly_loss.DINOLoss(out_dim, warmup_teacher_temp=warmup_temp, teacher_temp=teacher_temp,
                                   warmup_teacher_temp_epochs=warmup_steps, student_temp=student_temp,
                                   center_momentum=momentum)
    g = torch.Generator().manual_seed(n_views * 100 + warmup_steps)
    drift = torch.randn(out_dim, generator=g)
    for step in range(steps):
        # Logits of the size a weight-normed head gives (cosines, |x| <~ 1); the teacher's drift from
        # step to step gives the center something to track.
        teacher = torch.randn(n_global * batch, out_dim, generator=g) * 0.5 + step * 0.2 * drift
        student = torch.randn(n_views * batch, out_dim, generator=g) * 0.5
        loss = ours(student, teacher, step)
        expected = theirs(list(teacher.chunk(n_global)), list(student.chunk(n_views)), epoch=step)
        assert abs(loss.item() - expected.item()) <= TOL, f"step {step}: {loss.item()} vs {expected.item()}"
        torch.testing.assert_close(ours.center, theirs.center.reshape(1, out_dim), rtol=0, atol=TOL)
    assert ours.center.abs().max() > 0.1  # the center really moved


def test_loss_gradient_matches_lightly():
    out_dim, batch, n_global, n_views = 128, 4, 2, 8
    ours = DINOLoss(out_dim, n_global, n_views, 0.1, 0.04, 0.04, 0, 10, 0.9)
    theirs = lightly_loss.DINOLoss(out_dim, warmup_teacher_temp_epochs=0, teacher_temp=0.04, student_temp=0.1)
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(n_global * batch, out_dim, generator=g)
    student = torch.randn(n_views * batch, out_dim, generator=g)
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    ours(s1, teacher, 0).backward()
    theirs(list(teacher.chunk(n_global)), list(s2.chunk(n_views))).backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=0, atol=1e-7)


# ---- the head -----------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_head_forward_matches_lightly_with_copied_weights(norm_last_layer):
    torch.manual_seed(0)
    cfg = HeadConfig(out_dim=512, hidden_dim=96, bottleneck_dim=32, norm_last_layer=norm_last_layer)
    ours = DINOHead(48, cfg)
    theirs = _lightly_head(48, 96, 32, 512)
    if not norm_last_layer:
        theirs.last_layer.weight_g.requires_grad = True
    _copy_head(ours, theirs)
    x = torch.randn(10, 48)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=TOL)
    trainable = lambda params: [tuple(p.shape) for p in params if p.requires_grad]  # noqa: E731
    assert trainable(ours.parameters()) == trainable(_their_head_params(theirs))


# ---- one optimizer step, module level -------------------------------------------------------------


class _SmallBackbone(nn.Module):
    """A BatchNorm-free conv net: with BatchNorm, one concatenated forward (ours, as DINO) and one forward
    per view (lightly's loop) see different batch statistics by design, which is not what this test is about."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                                 nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.net(x)


@pytest.fixture
def float64_default():
    """Build modules and tensors in float64 (see the engine test below for why AdamW's first step needs it)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.mark.parametrize("n_global,n_local", CROPS)
def test_one_adamw_step_matches_lightly(n_global, n_local, float64_default):
    torch.manual_seed(0)
    batch, out_dim, lr, wd, ema = 6, 256, 1e-2, 0.04, 0.99
    head_cfg = HeadConfig(out_dim=out_dim, hidden_dim=64, bottleneck_dim=16)
    student = MultiCropWrapper(_SmallBackbone(), DINOHead(16, head_cfg), concat=True)
    teacher = copy.deepcopy(student).requires_grad_(False)
    l_backbone, l_head = copy.deepcopy(student.backbone), _lightly_head(16, 64, 16, out_dim)
    _copy_head(student.head, l_head)
    # A weight-normed lightly head cannot be deep-copied (its `weight` is not a leaf); build a second one.
    l_teacher_backbone, l_teacher_head = copy.deepcopy(l_backbone), _lightly_head(16, 64, 16, out_dim)
    _copy_head(teacher.head, l_teacher_head)

    g = torch.Generator().manual_seed(n_local)
    views = [torch.randn(batch, 3, 16, 16, generator=g) for _ in range(n_global)]
    views += [torch.randn(batch, 3, 8, 8, generator=g) for _ in range(n_local)]
    n_views = n_global + n_local

    # Ours: one backbone forward per resolution, head once, our loss, AdamW, our EMA.
    loss_fn = DINOLoss(out_dim, n_global, n_views, 0.1, 0.04, 0.04, 0, 10, 0.9)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=wd)
    with torch.no_grad():
        t_out = teacher(views[:n_global])
    loss = loss_fn(student(views), t_out, 0)
    loss.backward()
    opt.step()
    with torch.no_grad():
        t_params, s_params = list(teacher.parameters()), list(student.parameters())
        torch._foreach_mul_(t_params, ema)
        torch._foreach_add_(t_params, s_params, alpha=1 - ema)

    # lightly: one forward per view, lightly's loss, AdamW, update_momentum.
    l_loss_fn = lightly_loss.DINOLoss(out_dim, warmup_teacher_temp_epochs=0, teacher_temp=0.04, student_temp=0.1)
    l_params = list(l_backbone.parameters()) + _their_head_params(l_head)
    l_opt = torch.optim.AdamW([p for p in l_params if p.requires_grad], lr=lr, weight_decay=wd)
    with torch.no_grad():
        l_t_out = [l_teacher_head(l_teacher_backbone(v)) for v in views[:n_global]]
    l_loss = l_loss_fn(l_t_out, [l_head(l_backbone(v)) for v in views])
    l_loss.backward()
    l_opt.step()
    update_momentum(l_backbone, l_teacher_backbone, m=ema)
    update_momentum(l_head, l_teacher_head, m=ema)

    assert abs(loss.item() - l_loss.item()) <= TOL
    for ours_p, theirs_p in zip(s_params, l_params):
        torch.testing.assert_close(ours_p, theirs_p, rtol=0, atol=TOL)
    l_t_params = list(l_teacher_backbone.parameters()) + _their_head_params(l_teacher_head)
    for ours_p, theirs_p in zip(t_params, l_t_params):
        torch.testing.assert_close(ours_p, theirs_p, rtol=0, atol=TOL)
    torch.testing.assert_close(loss_fn.center, l_loss_fn.center.reshape(1, -1), rtol=0, atol=TOL)
    moved = max((a - b).abs().max().item() for a, b in zip(s_params, list(teacher.parameters())))
    assert moved > 1e-3  # the step did something a broken comparison could not hide


# ---- the engine's own step ---------------------------------------------------------------------


@pytest.mark.parametrize("dino_extras", [False, True], ids=["plain", "clip_and_frozen_last_layer"])
def test_engine_train_step_matches_lightly_loop(dino_extras):
    """`Run.train_step` (torchvision's ResNet-18, views fed directly) against lightly's per-view loop, two steps.

    `crops.concat_same_resolution=False` so both sides run one backbone forward per view: the ResNet's
    BatchNorm then sees the same batches on both sides. `dino_extras` adds DINO's per-parameter gradient
    clipping and the frozen last layer (lightly's `cancel_last_layer_gradients`).
    """
    clip = 0.3 if dino_extras else 0.0
    cfg = tiny_config(model__width=64, crops__concat_same_resolution=False, crops__local_crops=2, optim__clip_grad=clip,
                      optim__freeze_last_layer_epochs=1.0 if dino_extras else 0.0, optim__warmup_epochs=0.0,
                      optim__lr=4e-3, model__head__out_dim=128, budget__steps=4)
    run = Run(cfg, None, None)
    run.build()
    # float64 on both sides: AdamW's first step is lr * g / (|g| + eps), so a gradient element near eps
    # turns float32 rounding noise into update differences of ~lr; in float64 that noise is gone.
    for module in (run.student, run.teacher, run.dino_loss):
        module.double()  # in place: the optimizer and the EMA lists keep pointing at the same parameters
    n_global, n_views = cfg.crops.global_crops, cfg.crops.global_crops + cfg.crops.local_crops
    g = torch.Generator().manual_seed(3)
    steps_views = [[torch.randn(8, 3, 32, 32, generator=g, dtype=torch.float64) for _ in range(n_global)]
                   + [torch.randn(8, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(n_views - n_global)]
                   for _ in range(2)]

    h = cfg.model.head
    l_backbone = copy.deepcopy(run.student.backbone)
    l_head = _lightly_head(512, h.hidden_dim, h.bottleneck_dim, h.out_dim, freeze_last_layer=1 if dino_extras else -1)
    _copy_head(run.student.head, l_head)
    l_t_backbone, l_t_head = copy.deepcopy(run.teacher.backbone), _lightly_head(512, h.hidden_dim, h.bottleneck_dim, h.out_dim)
    _copy_head(run.teacher.head, l_t_head)
    l_head.double(), l_t_head.double()
    l_loss_fn = lightly_loss.DINOLoss(h.out_dim, warmup_teacher_temp_epochs=0, teacher_temp=cfg.loss.teacher_temp,
                                      student_temp=cfg.loss.student_temp).double()
    # Same parameter groups as the engine: weight decay on matrices only (DINO's get_params_groups).
    named = list(l_backbone.named_parameters()) + [(f"head.{n}", p) for n, p in l_head.named_parameters()]
    decay = [p for n, p in named if p.requires_grad and p.ndim > 1 and not n.endswith("bias")]
    no_decay = [p for n, p in named if p.requires_grad and (p.ndim <= 1 or n.endswith("bias"))]
    l_opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])

    for step, views in enumerate(steps_views):
        run.multicrop = lambda images, generator, views=views: views
        loss = run.train_step(iter([None]))
        run.step += 1

        for i, group in enumerate(l_opt.param_groups):
            group["lr"] = run.lr[step]
            if i == 0:
                group["weight_decay"] = run.wd[step]
        with torch.no_grad():
            t_out = [l_t_head(l_t_backbone(v)) for v in views[:n_global]]
        l_loss = l_loss_fn(t_out, [l_head(l_backbone(v)) for v in views], epoch=step)
        l_loss.backward()
        if clip:
            for _, p in named:  # DINO's utils.clip_gradients
                if p.grad is not None:
                    coef = clip / (p.grad.norm(2) + 1e-6)
                    if coef < 1:
                        p.grad.mul_(coef)
        l_head.cancel_last_layer_gradients(current_epoch=step // 3)
        l_opt.step()
        l_opt.zero_grad()
        update_momentum(l_backbone, l_t_backbone, m=float(run.momentum[step]))
        update_momentum(l_head, l_t_head, m=float(run.momentum[step]))

        assert abs(loss - l_loss.item()) <= TOL, f"step {step}: {loss} vs {l_loss.item()}"
        ours_s = list(run.student.backbone.parameters()) + list(run.student.head.parameters())
        for a, b in zip(ours_s, [p for _, p in named]):
            torch.testing.assert_close(a, b, rtol=0, atol=TOL)
        theirs_t = list(l_t_backbone.parameters()) + _their_head_params(l_t_head)
        for a, b in zip(list(run.teacher.backbone.parameters()) + list(run.teacher.head.parameters()), theirs_t):
            torch.testing.assert_close(a, b, rtol=0, atol=TOL)
        for (name, a), b in zip(run.teacher.backbone.named_buffers(), l_t_backbone.buffers()):
            torch.testing.assert_close(a, b, rtol=0, atol=TOL, msg=lambda m, name=name: f"{name}: {m}")
        torch.testing.assert_close(run.dino_loss.center, l_loss_fn.center.reshape(1, -1), rtol=0, atol=TOL)
    # With the last layer frozen the student's prototypes never move, so the teacher's EMA copy equals them.
    student_v = run.student.head.last_layer.parametrizations.weight.original1
    teacher_v = run.teacher.head.last_layer.parametrizations.weight.original1
    gap = (student_v - teacher_v).abs().max().item()
    assert (gap < 1e-7) if dino_extras else (gap > 1e-5)
