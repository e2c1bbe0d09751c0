"""Warm starts (`model.init`) and `trainer export-backbone`: torchvision's key names in and out.

The three forms of `model.init` (a torchvision-named state_dict file, a trainer checkpoint, a torchvision
weights name read from a local torch hub cache: nothing is downloaded here), the head starting fresh,
one-line errors naming `model.init` and the file, and an exported backbone that torchvision's resnet18
loads with strict=True, directly and through DINO's own loader.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from trainer import ConfigError, train
from trainer.cli import main as trainer_main
from trainer.engine import Run
from trainer.warmstart import export_backbone

from trainer_tiny import one_thread, tiny_config  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def _built(**overrides) -> Run:
    run = Run(tiny_config(**overrides), None, None)
    run.build()
    return run


def _torchvision_resnet18(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18()


def _assert_backbone_equals(run: Run, expected: dict[str, torch.Tensor]) -> None:
    """Student and teacher backbones both hold `expected` (torchvision names, fc ignored)."""
    for module in (run.student.backbone.net, run.teacher.backbone.net):
        state = module.state_dict()
        assert set(state) == {k for k in expected if not k.startswith("fc.")}
        assert all(torch.equal(v, expected[k]) for k, v in state.items())


def _saved_run(tmp_path, name, **overrides) -> Run:
    """A built run whose checkpoint (the engine's own writer) lies in tmp_path/name; student != teacher, and
    seed 1, so its teacher is not the backbone a seed-0 config starts from anyway."""
    run = Run(tiny_config(**{"system__seed": 1, **overrides}), None, tmp_path / name)
    run.build()
    with torch.no_grad():
        for p in run.student.backbone.parameters():
            p.add_(0.5)  # as if the student had trained ahead of its EMA teacher
    run.save_checkpoint({})
    return run


def test_torchvision_state_dict_file_warm_starts_student_and_teacher_and_the_head_starts_fresh(tmp_path):
    source = _torchvision_resnet18(seed=5).state_dict()  # includes fc.*, which is ignored
    torch.save(source, tmp_path / "resnet18.pth")
    cold = _built(model__width=64)
    warm = _built(model__width=64, model__init=str(tmp_path / "resnet18.pth"))
    _assert_backbone_equals(warm, source)
    assert not torch.equal(cold.student.backbone.net.conv1.weight, warm.student.backbone.net.conv1.weight)
    for a, b in zip(cold.student.head.state_dict().values(), warm.student.head.state_dict().values()):
        assert torch.equal(a, b)  # the head is the same fresh initialization as without a warm start
    assert "resnet18.pth: 120 tensors" in warm.init_loaded  # 122 in torchvision's state_dict, less fc's two


def test_dino_style_prefixed_checkpoint_loads_its_teacher_backbone(tmp_path):
    source = _torchvision_resnet18(seed=6).state_dict()
    teacher = {f"backbone.{k}": v for k, v in source.items() if not k.startswith("fc.")}
    teacher["head.mlp.0.weight"] = torch.zeros(4, 4)
    student = {f"module.{k}": torch.zeros_like(v) for k, v in teacher.items()}
    torch.save({"student": student, "teacher": teacher, "epoch": 3}, tmp_path / "dino_checkpoint.pth")
    _assert_backbone_equals(_built(model__width=64, model__init=str(tmp_path / "dino_checkpoint.pth")), source)


def test_trainer_checkpoint_or_run_folder_warm_starts_from_its_teacher_backbone(tmp_path):
    saved = _saved_run(tmp_path, "run")
    expected = saved.teacher.backbone.state_dict()
    cold = _built().teacher.backbone.state_dict()
    assert not torch.equal(cold["net.conv1.weight"], expected["net.conv1.weight"])
    for init in (tmp_path / "run", tmp_path / "run" / "checkpoint.pt"):
        warm = _built(model__init=str(init))
        for module in (warm.student.backbone, warm.teacher.backbone):
            assert all(torch.equal(v, expected[k]) for k, v in module.state_dict().items())
    assert "the teacher backbone of a trainer checkpoint at step 0" in warm.init_loaded


def test_a_warm_started_run_trains_from_the_loaded_weights(tmp_path):
    saved = _saved_run(tmp_path, "run")
    builds = []
    result = train(tiny_config(model__init=str(tmp_path / "run")), callback=lambda e, p: builds.append(p) if e == "build" else None)
    cold = train(tiny_config())
    assert result.status == "ok" and result.summary["steps"] == 6
    assert builds[0]["init"].endswith("the teacher backbone of a trainer checkpoint at step 0")
    assert (result.summary["knn_top1_initial"], result.summary["knn_top5_initial"]) == saved.knn(saved.teacher.backbone)
    assert result.losses[0] != cold.losses[0]  # same seed, data and head: only the backbone differs


def test_torchvision_weights_name_is_read_from_the_local_torch_hub_cache(tmp_path, monkeypatch):
    # Offline: the file torchvision would download, made here under the name torchvision expects.
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    source = _torchvision_resnet18(seed=7).state_dict()
    torch.save(source, cache / url.rsplit("/", 1)[1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    warm = _built(model__width=64, model__init="ResNet18_Weights.IMAGENET1K_V1")
    _assert_backbone_equals(warm, source)
    assert warm.init_loaded.startswith("ResNet18_Weights.IMAGENET1K_V1 (")


def _init_error(**overrides) -> str:
    with pytest.raises(ConfigError) as info:
        _built(**overrides)
    message = str(info.value)
    assert "\n" not in message and message.startswith("model.init: ")
    return message


def test_warm_start_mistakes_are_one_line_errors_naming_the_field_the_file_and_what_is_wrong(tmp_path, monkeypatch):
    missing = tmp_path / "nope.pth"
    assert f"{missing}: no such file" in _init_error(model__init=str(missing))
    torch.save({"conv9.weight": torch.zeros(1)}, tmp_path / "other.pth")
    msg = _init_error(model__width=64, model__init=str(tmp_path / "other.pth"))
    assert "other.pth: keys do not match the resnet18 (width 64, stem imagenet) backbone: 120 missing (e.g. conv1.weight)" in msg
    assert "1 unexpected (e.g. conv9.weight)" in msg
    (tmp_path / "text.pth").write_text("not torch")
    assert "text.pth: not a readable torch state_dict or checkpoint" in _init_error(model__init=str(tmp_path / "text.pth"))
    # torchvision's resnet18 into the width-16 model: same names, other shapes
    torch.save(_torchvision_resnet18(seed=0).state_dict(), tmp_path / "resnet18.pth")
    msg = _init_error(model__init=str(tmp_path / "resnet18.pth"))
    assert "resnet18.pth: conv1.weight has shape [64, 3, 7, 7] but the resnet18 (width 16, stem imagenet) backbone needs [16, 3, 7, 7]" in msg
    assert msg.endswith("torchvision-format weights fit only resnet18/resnet50 at model.width 64 with model.stem imagenet")
    # a width-16 trainer checkpoint into a width-64 model
    _saved_run(tmp_path, "narrow")
    msg = _init_error(model__width=64, model__init=str(tmp_path / "narrow"))
    assert msg == (f"model.init: {tmp_path / 'narrow' / 'checkpoint.pt'} is a trainer checkpoint of a resnet18 (width 16, "
                   "stem imagenet) backbone, but this config's is resnet18 (width 64, stem imagenet); "
                   "model.backbone, model.width, model.stem must match")
    assert "is a folder without a trainer checkpoint.pt" in _init_error(model__init=str(tmp_path))
    # weights names: unknown, for another architecture, and not downloadable here
    assert "'ResNet18_Weights.NOPE' is neither a file nor a torchvision weights name" in _init_error(
        model__width=64, model__init="ResNet18_Weights.NOPE")
    assert "ResNet50_Weights.IMAGENET1K_V2 are weights for torchvision's resnet50, but model.backbone is resnet18" in _init_error(
        model__width=64, model__init="ResNet50_Weights.IMAGENET1K_V2")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))

    def no_network(url, dst, *args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    msg = _init_error(model__width=64, model__init="ResNet18_Weights.IMAGENET1K_V1")
    assert f"not in the torch hub cache ({tmp_path / 'empty_home' / 'hub' / 'checkpoints' / 'resnet18-f37072fd.pth'})" in msg
    assert "Temporary failure in name resolution" in msg


def test_trainer_train_reports_a_bad_init_in_one_line(tmp_path, capsys):
    code = trainer_main(["train", "--set", f"model.init={tmp_path / 'missing.pth'}", "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == (f"error: model.init: {tmp_path / 'missing.pth'}: no such file (give a backbone state_dict file, "
                                     "a trainer run folder or checkpoint.pt, or a torchvision weights name like "
                                     "ResNet18_Weights.IMAGENET1K_V1)")


def _dino_load_pretrained_weights(model: nn.Module, path, checkpoint_key: str) -> None:
    """The key handling of DINO's utils.load_pretrained_weights (facebookresearch/dino), with strict=True."""
    state_dict = torch.load(path, map_location="cpu")
    if checkpoint_key is not None and checkpoint_key in state_dict:
        state_dict = state_dict[checkpoint_key]
    state_dict = {k.replace("module.", ""): v for k, v in state_dict.items()}
    state_dict = {k.replace("backbone.", ""): v for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True)


def test_exported_width_64_backbone_loads_strictly_into_torchvision_and_through_dinos_loader(tmp_path, capsys):
    saved = _saved_run(tmp_path, "run", model__width=64)
    assert trainer_main(["export-backbone", str(tmp_path / "run"), "-o", str(tmp_path / "backbone.pth")]) == 0
    out = capsys.readouterr().out
    assert "wrote 120 tensors of the teacher backbone (resnet18 (width 64, stem imagenet), step 0)" in out
    assert "loads with strict=True into torchvision's model" in out
    exported = torch.load(tmp_path / "backbone.pth", weights_only=True)
    assert not any(k.startswith(("fc.", "net.", "backbone.")) for k in exported)
    net = torchvision.models.resnet18()
    net.fc = nn.Identity()
    net.load_state_dict(exported, strict=True)
    teacher = saved.teacher.backbone.net.state_dict()
    assert all(torch.equal(v, teacher[k]) for k, v in net.state_dict().items())
    # torchvision's resnet18 with its fc: strict after dropping fc, i.e. fc's are the only keys it lacks
    missing = torchvision.models.resnet18().load_state_dict(exported, strict=False)
    assert sorted(missing.missing_keys) == ["fc.bias", "fc.weight"] and missing.unexpected_keys == []
    # DINO's loader: a checkpoint dict whose teacher has the MultiCropWrapper's `backbone.` prefix
    torch.save({"teacher": {f"backbone.{k}": v for k, v in exported.items()}}, tmp_path / "dino_style.pth")
    dino_net = torchvision.models.resnet18()
    dino_net.fc = nn.Identity()
    _dino_load_pretrained_weights(dino_net, tmp_path / "dino_style.pth", "teacher")
    assert all(torch.equal(v, teacher[k]) for k, v in dino_net.state_dict().items())
    # and the exported file warm-starts this project's own width-64 model
    _assert_backbone_equals(_built(model__width=64, model__init=str(tmp_path / "backbone.pth")), exported)


def test_export_of_the_student_and_of_a_narrow_backbone_says_torchvision_cannot_load_it(tmp_path, capsys):
    saved = _saved_run(tmp_path, "narrow")
    info = export_backbone(tmp_path / "narrow" / "checkpoint.pt", tmp_path / "student.pth", which="student")
    assert info["torchvision_compatible"] is False and info["which"] == "student"
    exported = torch.load(tmp_path / "student.pth", weights_only=True)
    student = saved.student.backbone.net.state_dict()
    assert set(exported) == set(student) and all(torch.equal(v, student[k]) for k, v in exported.items())
    with pytest.raises(RuntimeError, match="size mismatch"):
        torchvision.models.resnet18().load_state_dict(exported, strict=False)
    assert trainer_main(["export-backbone", str(tmp_path / "narrow"), "-o", str(tmp_path / "t.pth")]) == 0
    assert "note: resnet18 (width 16, stem imagenet) is not torchvision's shape" in capsys.readouterr().err
    # round trip into the same narrow model through model.init's state_dict form
    warm = _built(model__init=str(tmp_path / "student.pth"))
    assert all(torch.equal(v, student[k]) for k, v in warm.teacher.backbone.net.state_dict().items())


def test_export_backbone_mistakes_are_one_line(tmp_path, capsys):
    assert trainer_main(["export-backbone", str(tmp_path / "none"), "-o", str(tmp_path / "b.pth")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 'none'}: no trainer checkpoint (give a run folder "
                                               "holding checkpoint.pt, or the file)")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "plain.pth")
    assert trainer_main(["export-backbone", str(tmp_path / "plain.pth"), "-o", str(tmp_path / "b.pth")]) == 2
    assert "not a trainer checkpoint (no 'config' and 'teacher' entries)" in capsys.readouterr().err
    assert not (tmp_path / "b.pth").exists()


def test_export_backbone_reads_a_checkpoint_written_after_optimizer_steps(tmp_path):
    """A real run's checkpoint holds the optimizer's lr and weight decay; export must read it (issue 18)."""
    run = Run(tiny_config(system__seed=1), None, tmp_path / "stepped")
    run.build()
    run.optimizer_step(0)
    assert all(type(g["lr"]) is float for g in run.optimizer.param_groups)
    run.save_checkpoint({})
    assert trainer_main(["export-backbone", str(tmp_path / "stepped"), "-o", str(tmp_path / "b.pth")]) == 0
