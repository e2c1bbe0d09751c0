"""`TrainConfig`: lossless YAML, typed `--set` overrides, and one-line errors that name file, field and allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer import ConfigError, TrainConfig
from trainer.cli import main
from trainer.config import default_config_path

MANY_NON_DEFAULTS = {
    "data.dataset": "imagefolder", "data.root": "/tmp/some images", "data.image_size": 48,
    "data.digit_scale": [0.3, 0.9], "data.max_images": 300, "data.val_fraction": 0.125,
    "crops.global_crops": 3, "crops.local_crops": 7, "crops.local_scale": [0.1, 0.35],
    "crops.concat_same_resolution": False, "augment.blur": False, "augment.solarization": False,
    "model.backbone": "vit_tiny", "model.patch_size": 8, "model.vit_depth": 4,
    "model.head.out_dim": 4096, "model.head.use_bn": True, "model.head.norm_last_layer": False,
    "loss.student_temp": 0.2, "loss.warmup_teacher_temp_epochs": 2.5, "loss.pairing": "global_to_local",
    "optim.lr": 1.5e-4, "optim.accumulation_steps": 4, "optim.fused": True,
    "system.precision": "bf16", "system.compile": "max-autotune", "system.num_workers": 3,
    "system.prefetch_factor": 4, "system.persistent_workers": True, "budget.steps": 1234,
    "budget.time_limit_s": 90.5, "eval.every_steps": 50, "measure.windows": 7, "checkpoint_every_steps": 25,
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---- round trips ---------------------------------------------------------------------------------


def test_default_config_round_trips_through_yaml(tmp_path):
    cfg = TrainConfig()
    again = TrainConfig.load(cfg.save(tmp_path / "c.yaml", header="a header\nover two lines"))
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()


def test_embedded_default_file_is_valid_and_loads_without_a_path():
    assert TrainConfig.load() == TrainConfig.load(default_config_path())


def test_config_with_many_non_defaults_round_trips_through_yaml(tmp_path):
    cfg = TrainConfig().with_overrides(MANY_NON_DEFAULTS)
    assert cfg != TrainConfig()
    again = TrainConfig.load(cfg.save(tmp_path / "many.yaml"))
    assert again == cfg
    assert again.data.root == Path("/tmp/some images")
    assert again.crops.local_scale == (0.1, 0.35)
    assert again.budget.time_limit_s == 90.5 and again.model.vit_depth == 4


# ---- --set overrides -------------------------------------------------------------------------------


def test_set_overrides_parse_int_float_bool_list_string_and_null(tmp_path):
    path = TrainConfig().save(tmp_path / "c.yaml")
    cfg = TrainConfig.load(path, [
        "optim.batch_size=32", "optim.lr=1e-3", "loss.teacher_temp=0.07", "augment.blur=false",
        "crops.global_scale=[0.3, 1.0]", "model.backbone=vit_small", "model.patch_size=8",
        "data.max_images=null", "budget.steps=100",
    ])
    assert cfg.optim.batch_size == 32 and isinstance(cfg.optim.batch_size, int)
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.loss.teacher_temp == 0.07
    assert cfg.augment.blur is False
    assert cfg.crops.global_scale == (0.3, 1.0)
    assert cfg.model.backbone == "vit_small"
    assert cfg.data.max_images is None and cfg.budget.steps == 100


def test_with_overrides_accepts_a_dict_and_leaves_the_original_unchanged():
    base = TrainConfig()
    cfg = base.with_overrides({"model.head.out_dim": 1024, "crops.local_crops": 6})
    assert (cfg.model.head.out_dim, cfg.crops.local_crops) == (1024, 6)
    assert (base.model.head.out_dim, base.crops.local_crops) == (65536, 2)


# ---- errors: one line, naming the file, the field and what is allowed -------------------------------


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_unknown_key_in_file_names_file_field_and_allowed_keys(tmp_path):
    path = _write(tmp_path / "bad.yaml", "crops:\n  local_crop: 4\n")
    with pytest.raises(ConfigError) as exc:
        TrainConfig.load(path)
    msg = _one_line(exc)
    assert str(path) in msg and "crops.local_crop" in msg
    assert "allowed keys:" in msg and "local_crops" in msg and "global_crops" in msg


def test_unknown_top_level_section_lists_the_sections(tmp_path):
    path = _write(tmp_path / "bad.yaml", "optimizer:\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as exc:
        TrainConfig.load(path)
    msg = _one_line(exc)
    assert "'optimizer'" in msg and "optim" in msg and "crops" in msg


def test_out_of_range_value_names_field_bound_and_value(tmp_path):
    path = _write(tmp_path / "bad.yaml", "crops:\n  local_crops: 99\n")
    with pytest.raises(ConfigError) as exc:
        TrainConfig.load(path)
    msg = _one_line(exc)
    assert str(path) in msg and "crops.local_crops" in msg and "less than or equal to 16" in msg and "99" in msg


def test_bad_choice_names_the_allowed_values(tmp_path):
    path = _write(tmp_path / "bad.yaml", "model:\n  backbone: resnet9\n")
    with pytest.raises(ConfigError) as exc:
        TrainConfig.load(path)
    msg = _one_line(exc)
    assert "model.backbone" in msg and "'resnet18'" in msg and "'vit_small'" in msg and "resnet9" in msg


def test_bad_override_value_names_the_override_source_and_field(tmp_path):
    path = TrainConfig().save(tmp_path / "c.yaml")
    with pytest.raises(ConfigError) as exc:
        TrainConfig.load(path, ["model.head.out_dim=lots"])
    msg = _one_line(exc)
    assert str(path) in msg and "model.head.out_dim" in msg and "integer" in msg


def test_override_without_equals_sign_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as exc:
        TrainConfig.load(TrainConfig().save(tmp_path / "c.yaml"), ["optim.lr"])
    assert "section.field=value" in _one_line(exc)


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = _write(tmp_path / "broken.yaml", "crops:\n  local_crops: 2\n  global_crops: [2\n")
    with pytest.raises(ConfigError) as exc:
        TrainConfig.load(path)
    msg = _one_line(exc)
    assert str(path) in msg and "invalid YAML" in msg and "line" in msg


def test_yaml_that_is_not_a_mapping_is_rejected(tmp_path):
    with pytest.raises(ConfigError) as exc:
        TrainConfig.load(_write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    assert "expected a mapping" in _one_line(exc)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError) as exc:
        TrainConfig.load(tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in _one_line(exc) and "no such config file" in str(exc.value)


def test_inconsistent_sections_are_a_config_error(tmp_path):
    path = _write(tmp_path / "bad.yaml", "crops:\n  local_crops: 0\nloss:\n  pairing: global_to_local\n")
    with pytest.raises(ConfigError) as exc:
        TrainConfig.load(path)
    assert "global_to_local" in _one_line(exc)


# ---- the CLI turns config errors into one stderr line and exit code 2 -------------------------------


@pytest.mark.parametrize("case", ["unknown_key", "bad_value", "bad_yaml", "missing_file", "bad_set"])
def test_cli_config_errors_exit_2_with_one_line_and_no_traceback(case, tmp_path, capsys):
    files = {
        "unknown_key": "optim:\n  learning_rate: 0.1\n",
        "bad_value": "optim:\n  batch_size: 0\n",
        "bad_yaml": "optim: {batch_size: 3\n",
    }
    path = tmp_path / "c.yaml"
    if case in files:
        path.write_text(files[case])
    elif case == "bad_set":
        TrainConfig().save(path)
    args = ["train", str(path), "--out", str(tmp_path / "run"), "--quiet"]
    if case == "bad_set":
        args += ["--set", "system.precision=fp8"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and str(path) in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing started


def test_cli_bench_config_error_exits_2(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "missing.yaml"), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "no such config file" in captured.err
