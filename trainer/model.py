"""Backbones from torchvision, the DINO head, and the multi-crop wrapper that runs them."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trainer.config import HeadConfig, ModelConfig

VIT_SIZES = {"vit_tiny": (192, 3), "vit_small": (384, 6)}


def build_backbone(cfg: ModelConfig, image_size: int) -> tuple[nn.Module, int]:
    """A torchvision backbone with its classifier removed, and its feature dimension."""
    if cfg.backbone.startswith("resnet"):
        expansion = {"resnet18": 1, "resnet50": 4}[cfg.backbone]
        return ResNetBackbone(cfg), 8 * cfg.width * expansion
    dim, heads = VIT_SIZES[cfg.backbone]
    return ViTBackbone(cfg, image_size, dim, heads), dim


def _resnet(name: str, width: int) -> nn.Module:
    """torchvision's resnet18/resnet50 with `width` channels in the first stage (64: torchvision's own)."""
    import torchvision
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    if width == 64:
        return getattr(torchvision.models, name)(weights=None)

    class _Scaled(ResNet):
        def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
            if planes == 64:  # first stage: the stem below outputs `width` channels
                self.inplanes = width
            return super()._make_layer(block, planes * width // 64, blocks, stride, dilate)

    block, layers = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet50": (Bottleneck, [3, 4, 6, 3])}[name]
    net = _Scaled(block, layers)
    net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision's ResNet
    net.bn1 = nn.BatchNorm2d(width)
    return net


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@contextlib.contextmanager
def _running_stats_kept(module: nn.Module):
    """Whatever runs inside leaves the running statistics of `module`'s BatchNorm layers as they were.

    Gradient checkpointing runs a block's forward twice, the second time during backward. Without this,
    the recomputation updates every BatchNorm's running mean and variance (and its batch counter) a
    second time with the same batch, so a checkpointed run ends with other running statistics than a
    plain one (the parity check found it). The recomputed activations are unchanged either way: in
    training mode BatchNorm normalizes with the batch's own statistics.
    """
    norms = [m for m in module.modules() if isinstance(m, _BATCH_NORMS) and m.track_running_stats]
    saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(norms, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


def checkpointed(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`block(x)` with its activations recomputed in backward (non-reentrant), running statistics updated once."""
    return checkpoint(block, x, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _running_stats_kept(block)))


class ResNetBackbone(nn.Module):
    """torchvision ResNet without `fc`. Stems: imagenet (7x7/2 conv + 3x3/2 max-pool, /4), small (3x3/1
    conv + max-pool, /2: for 32 px inputs, where the imagenet stem leaves the last stage 1x1) and cifar
    (3x3/1 conv, no pool, /1)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        net = _resnet(cfg.backbone, cfg.width)
        if cfg.stem in ("cifar", "small"):
            net.conv1 = nn.Conv2d(3, cfg.width, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        if cfg.stem == "cifar":
            net.maxpool = nn.Identity()
        net.fc = nn.Identity()
        self.net = net
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        for layer in (n.layer1, n.layer2, n.layer3, n.layer4):
            x = checkpointed(layer, x) if self.grad_checkpointing and self.training else layer(x)
        return torch.flatten(n.avgpool(x), 1)


class ViTBackbone(nn.Module):
    """torchvision's VisionTransformer, returning the class token, with the position embedding
    interpolated so local crops (smaller than `image_size`) go through the same weights, as DINO does."""

    def __init__(self, cfg: ModelConfig, image_size: int, dim: int, heads: int):
        super().__init__()
        from torchvision.models import VisionTransformer

        self.vit = VisionTransformer(
            image_size=image_size, patch_size=cfg.patch_size, num_layers=cfg.vit_depth or 12,
            num_heads=heads, hidden_dim=dim, mlp_dim=4 * dim,
        )
        self.vit.heads = nn.Identity()
        self.patch_size = cfg.patch_size
        self.grad_checkpointing = False

    def _pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        pos = self.vit.encoder.pos_embedding
        cls_pos, grid = pos[:, :1], pos[:, 1:]
        n = int(grid.shape[1] ** 0.5)
        if gh == n and gw == n:
            return pos
        grid = grid.reshape(1, n, n, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.vit
        b, _, h, w = x.shape
        x = v.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_token.expand(b, -1, -1), x], dim=1)
        x = v.encoder.dropout(x + self._pos_embed(h // self.patch_size, w // self.patch_size))
        for block in v.encoder.layers:
            x = checkpointed(block, x) if self.grad_checkpointing and self.training else block(x)
        return v.encoder.ln(x)[:, 0]


class DINOHead(nn.Module):
    """MLP -> L2-normalized bottleneck -> weight-normalized linear layer to `out_dim` prototypes.

    With `norm_last_layer` the weight-norm gain is fixed at 1, so the last layer is a cosine similarity
    against the prototypes; DINO found this stabilizes training.
    """

    def __init__(self, in_dim: int, cfg: HeadConfig):
        super().__init__()
        layers: list[nn.Module] = []
        dims = [in_dim] + [cfg.hidden_dim] * (cfg.nlayers - 1) + [cfg.bottleneck_dim]
        for i in range(cfg.nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < cfg.nlayers - 1:
                if cfg.use_bn:
                    layers.append(nn.BatchNorm1d(dims[i + 1]))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(cfg.bottleneck_dim, cfg.out_dim, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        if cfg.norm_last_layer:
            self.last_layer.parametrizations.weight.original0.requires_grad = False

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of views.

    With `concat=True`, consecutive views of the same resolution are concatenated and go through the
    backbone in one forward (one call for the global crops, one for the local crops), and the head runs
    once on all features; that is most of what makes many-crop DINO affordable. With `concat=False`
    each view is its own backbone forward (the cost practitioners pay with naive loops).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, concat: bool = True):
        super().__init__()
        self.backbone, self.head, self.concat = backbone, head, concat

    def compile_backbone(self, mode: str | None, dynamic: bool | None) -> None:
        """Compile the backbone for this wrapper's forwards only (training). It is kept out of the module
        tree, so state_dict keys, checkpoints and exports stay as they are, and evaluation, which calls the
        backbone itself, stays eager and never compiles a second graph."""
        self.__dict__["_compiled_backbone"] = torch.compile(self.backbone, mode=mode, dynamic=dynamic)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        backbone = self.__dict__.get("_compiled_backbone", self.backbone)
        if not self.concat:
            feats = [backbone(v) for v in views]
        else:
            feats, start = [], 0
            sizes = [v.shape[-1] for v in views]
            while start < len(views):
                end = start
                while end < len(views) and sizes[end] == sizes[start]:
                    end += 1
                feats.append(backbone(torch.cat(views[start:end])))
                start = end
        return self.head(torch.cat(feats))
