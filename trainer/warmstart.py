"""Warm starts and backbone export: pretrained weights in (`model.init`), trained weights out.

Continuing DINO from pretrained weights is how most users adapt it to their own data, and a trained
backbone is only useful if other code can load it. Both directions speak torchvision's key names: the
project's `ResNetBackbone` wraps torchvision's ResNet as `.net` (and `ViTBackbone` its
VisionTransformer as `.vit`), so stripping that prefix gives the names `torchvision.models.resnet18()`
uses, without `fc` (DINO's own evaluation sets `fc = nn.Identity()`, and so does the trainer).

`model.init` accepts:
- a state_dict file with torchvision's key names (`fc.*` ignored; `module.` / `backbone.` prefixes, as
  DINO writes them, stripped), or a DINO checkpoint (its `teacher` entry is taken);
- a `trainer` checkpoint (a run folder or its `checkpoint.pt`): its teacher backbone;
- a torchvision weights name such as `ResNet18_Weights.IMAGENET1K_V1`, read from the torch hub cache
  (`$TORCH_HOME/hub/checkpoints`) or downloaded there where the machine can;
- `supervised` or `supervised:STEPS`: the project's own warm start, trained with labels on the run's
  training split, built once and cached (`trainer.pretrain`).

Only torchvision's own shapes fit torchvision's weights: resnet18/resnet50 at `model.width: 64` with the
`imagenet` stem. The project's narrower widths and small/cifar stems have the same key names but other
shapes; they load from (and export to) the project's own checkpoints only. Every mismatch is a one-line
`ConfigError` naming `model.init`, the file and what does not fit.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn as nn

from trainer.config import ConfigError, ModelConfig
from trainer.pretrain import is_builtin, warm_backbone_file

CHECKPOINT = "checkpoint.pt"  # a run folder's checkpoint (trainer.engine writes it under this name)
WEIGHTS_NAME = re.compile(r"^\w+_Weights\.\w+$")


def torchvision_compatible(model: ModelConfig | dict[str, Any]) -> bool:
    """Whether this model's backbone has torchvision's shapes (and so loads torchvision's weights and vice versa)."""
    m = model if isinstance(model, dict) else model.model_dump()
    return m["backbone"] in ("resnet18", "resnet50") and m["width"] == 64 and m["stem"] == "imagenet"


def describe(model: ModelConfig | dict[str, Any]) -> str:
    """`resnet18 (width 16, stem small)`: the fields that decide a backbone's shapes."""
    m = model if isinstance(model, dict) else model.model_dump()
    if str(m["backbone"]).startswith("vit"):
        return f"{m['backbone']} (patch {m['patch_size']}, depth {m.get('vit_depth') or 12})"
    return f"{m['backbone']} (width {m['width']}, stem {m['stem']})"


def _torchvision_part(backbone: nn.Module) -> tuple[nn.Module, str, str]:
    """The wrapped torchvision module, its attribute prefix and the classifier prefix torchvision adds."""
    if hasattr(backbone, "net"):
        return backbone.net, "net.", "fc."
    return backbone.vit, "vit.", "heads."


# ---- in: model.init -------------------------------------------------------------------------------

def load_init(backbone: nn.Module, cfg) -> str:
    """Load `cfg.model.init` into `backbone` in place (before student and teacher are made from it).

    The whole TrainConfig, because the built-in warm start (`supervised[:STEPS]`, see `trainer.pretrain`)
    is trained on the run's own training split and cached.
    Returns one line saying what was loaded; raises a one-line `ConfigError` for a missing file, an
    unknown weights name, keys that do not match, or shapes that do not fit.
    """
    model = cfg.model
    spec = str(model.init)
    if is_builtin(spec):
        path = warm_backbone_file(cfg)
        _load_checked(backbone, _read(path), str(path), model, "")
        return f"{spec}: the cached warm backbone {path}"
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / CHECKPOINT).is_file():
            raise ConfigError(f"model.init: {path} is a folder without a trainer {CHECKPOINT}")
        path = path / CHECKPOINT
    if path.is_file():
        data = _read(path)
        if isinstance(data, dict) and "config" in data and "teacher" in data:
            return _from_trainer_checkpoint(backbone, model, data, path)
        return _from_torchvision_names(backbone, model, _state_dict_of(data, path), str(path))
    if WEIGHTS_NAME.match(spec):
        return _from_weights_name(backbone, model, spec)
    raise ConfigError(f"model.init: {spec}: no such file (give a backbone state_dict file, a trainer run folder or "
                      f"checkpoint.pt, or a torchvision weights name like ResNet18_Weights.IMAGENET1K_V1)")


def _read(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, truncated, or pickled objects beyond tensors and plain data
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model.init: {path}: not a readable torch state_dict or checkpoint ({first})") from None


def _state_dict_of(data: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a plain state_dict, or of a DINO checkpoint's teacher, with DINO's prefixes removed."""
    if isinstance(data, dict) and isinstance(data.get("teacher"), dict):
        data = data["teacher"]  # a DINO checkpoint (main_dino.py saves student, teacher, optimizer, ...)
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ConfigError(f"model.init: {path}: not a state_dict (a mapping of parameter names to tensors)")
    state = {k.removeprefix("module."): v for k, v in data.items()}
    if any(k.startswith("backbone.") for k in state):  # DINO's MultiCropWrapper: backbone.* and head.*
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    return state


def _from_torchvision_names(backbone: nn.Module, model: ModelConfig, state: dict[str, torch.Tensor], source: str) -> str:
    target, _, classifier = _torchvision_part(backbone)
    state = {k: v for k, v in state.items() if not k.startswith(classifier)}
    hint = "" if torchvision_compatible(model) else (
        "; torchvision-format weights fit only resnet18/resnet50 at model.width 64 with model.stem imagenet")
    _load_checked(target, state, source, model, hint)
    return f"{source}: {len(state)} tensors (torchvision names) into the {describe(model)} backbone"


def _from_trainer_checkpoint(backbone: nn.Module, model: ModelConfig, data: dict, path: Path) -> str:
    saved = (data.get("config") or {}).get("model") or {}
    keys = ("backbone", "width", "stem") if model.backbone.startswith("resnet") else ("backbone", "patch_size", "vit_depth")
    if any(saved.get(k) != getattr(model, k) for k in keys):
        raise ConfigError(f"model.init: {path} is a trainer checkpoint of a {describe(saved)} backbone, but this "
                          f"config's is {describe(model)}; model.{', model.'.join(keys)} must match")
    state = {k.removeprefix("backbone."): v for k, v in data["teacher"].items() if k.startswith("backbone.")}
    _load_checked(backbone, state, str(path), model, "")
    return f"{path}: the teacher backbone of a trainer checkpoint at step {data.get('step')}"


def _from_weights_name(backbone: nn.Module, model: ModelConfig, name: str) -> str:
    from torchvision.models import get_weight

    try:
        weights = get_weight(name)
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"model.init: {name!r} is neither a file nor a torchvision weights name "
                          f"({str(exc).strip(chr(39))}); e.g. ResNet18_Weights.IMAGENET1K_V1") from None
    arch = type(weights).__name__.removesuffix("_Weights").lower()
    if arch != model.backbone:
        raise ConfigError(f"model.init: {name} are weights for torchvision's {arch}, but model.backbone is "
                          f"{model.backbone}; torchvision-format weights fit only resnet18/resnet50")
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))
    try:
        state = weights.get_state_dict(progress=False, map_location="cpu", weights_only=True)
    except Exception as exc:  # no network, a proxy, a partial file
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model.init: {name}: not in the torch hub cache ({cached}) and the download failed "
                          f"({reason}); download it where the machine can, or copy the file there") from None
    return _from_torchvision_names(backbone, model, state, f"{name} ({cached})")


def _load_checked(target: nn.Module, state: dict[str, torch.Tensor], source: str, model: ModelConfig, hint: str) -> None:
    """`load_state_dict(strict=True)`, after checking keys and shapes so a mismatch reads as one line."""
    expected = target.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = ([f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []) + (
            [f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"] if unexpected else [])
        raise ConfigError(f"model.init: {source}: keys do not match the {describe(model)} backbone: "
                          f"{', '.join(parts)}{hint}")
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise ConfigError(f"model.init: {source}: {key} has shape {list(state[key].shape)} but the "
                              f"{describe(model)} backbone needs {list(value.shape)}{hint}")
    target.load_state_dict(state, strict=True)


# ---- out: export ----------------------------------------------------------------------------------

def export_backbone(source: str | Path, output: str | Path, which: str = "teacher") -> dict[str, Any]:
    """Write the `which` backbone of a trainer run (folder or checkpoint.pt) to `output` with torchvision's
    key names (no `fc`), so `torchvision.models.resnet18()` with `fc = nn.Identity()` loads it with
    `strict=True`, as does DINO's `load_pretrained_weights`, and `model.init` reads it back.

    Returns what was written: path, tensors, the model and whether torchvision's own model fits it.
    """
    if which not in ("teacher", "student"):
        raise ConfigError(f"--which: {which!r}; allowed: teacher, student")
    path = Path(source)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"{source}: no trainer checkpoint (give a run folder holding {CHECKPOINT}, or the file)")
    try:
        # Checkpoints written before the optimizer's lr and weight decay were stored as floats hold numpy scalars.
        import numpy as np

        numpy_scalar = [np.float64(0).__reduce__()[0], np.dtype, type(np.dtype(np.float64))]
        with torch.serialization.safe_globals(numpy_scalar):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"{path}: not a readable trainer checkpoint ({type(exc).__name__})") from None
    if not (isinstance(data, dict) and "config" in data and which in data):
        raise ConfigError(f"{path}: not a trainer checkpoint (no 'config' and '{which}' entries)")
    model = data["config"]["model"]
    prefix = "backbone.vit." if str(model["backbone"]).startswith("vit") else "backbone.net."
    state = {k.removeprefix(prefix): v.clone() for k, v in data[which].items() if k.startswith(prefix)}
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, output)
    compatible = torchvision_compatible(model)
    return {"path": str(output), "tensors": len(state), "model": describe(model), "step": data.get("step"),
            "which": which, "torchvision_compatible": compatible}
