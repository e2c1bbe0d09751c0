"""Backbones, the DINO head and the multi-crop wrapper: shapes, `model.width`, and what concatenation changes."""

from __future__ import annotations

import pytest
import torch
import torchvision

from trainer.config import HeadConfig, ModelConfig
from trainer.model import DINOHead, MultiCropWrapper, build_backbone

from trainer_tiny import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_default_width_is_torchvisions_resnet18():
    backbone, dim = build_backbone(ModelConfig(), 32)
    reference = torchvision.models.resnet18(weights=None)
    reference.fc = torch.nn.Identity()
    assert dim == 512
    assert [tuple(p.shape) for p in backbone.net.parameters()] == [tuple(p.shape) for p in reference.parameters()]


@pytest.mark.parametrize("arch,width,stem,dim", [("resnet18", 16, "imagenet", 128), ("resnet18", 8, "cifar", 64),
                                                 ("resnet18", 16, "small", 128), ("resnet50", 32, "imagenet", 1024)])
def test_width_scales_every_stage(arch, width, stem, dim):
    backbone, got_dim = build_backbone(ModelConfig(backbone=arch, width=width, stem=stem), 32)
    assert got_dim == dim
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, dim)
    assert backbone.net.conv1.out_channels == width and backbone.net.layer4[-1].bn1.num_features == 8 * width
    # Parameters scale with width squared: a quarter of the width is about a sixteenth of the weights.
    full = _n_params(build_backbone(ModelConfig(backbone=arch, stem=stem), 32)[0])
    assert _n_params(backbone) < full * (width / 64) ** 2 * 1.1


def test_vit_backbone_takes_local_crops_smaller_than_its_image_size():
    backbone, dim = build_backbone(ModelConfig(backbone="vit_tiny", patch_size=8, vit_depth=1), 32)
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, dim) == backbone(torch.randn(2, 3, 16, 16)).shape


def test_head_output_is_cosine_to_prototypes_with_the_gain_frozen():
    head = DINOHead(32, HeadConfig(out_dim=100, hidden_dim=48, bottleneck_dim=16))
    out = head(torch.randn(5, 32))
    assert out.shape == (5, 100) and out.abs().max() <= 1 + 1e-5  # unit bottleneck . unit prototypes
    assert not head.last_layer.parametrizations.weight.original0.requires_grad


def test_concatenated_and_per_view_forwards_agree_without_batch_statistics():
    backbone, dim = build_backbone(ModelConfig(width=8), 32)
    head = DINOHead(dim, HeadConfig(out_dim=50, hidden_dim=32, bottleneck_dim=16))
    views = [torch.randn(3, 3, 32, 32) for _ in range(2)] + [torch.randn(3, 3, 16, 16) for _ in range(4)]
    concat, per_view = MultiCropWrapper(backbone, head, concat=True).eval(), MultiCropWrapper(backbone, head, concat=False).eval()
    with torch.no_grad():
        a, b = concat(views), per_view(views)
    assert a.shape == (18, 50)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # In training mode BatchNorm normalizes over whatever batch it is given, so concatenation (DINO's
    # choice) and per-view forwards (lightly's loop) differ by design.
    with torch.no_grad():
        assert (concat.train()(views) - per_view.train()(views)).abs().max() > 1e-3
