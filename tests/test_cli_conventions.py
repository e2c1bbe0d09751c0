"""The command lines as a user of Hydra, Optuna or torchvision would type them: overrides in both
spellings, names of shipped files, `trainer config`, one-line usage errors with exit code 2, and
bad values (binary files, negative budgets, malformed storage URLs) that leave every database as it was."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from trainer.cli import main as trainer_main
from trainer.config import ConfigError, TrainConfig, default_config_path, packaged_config_names
from tuner.cli import main as tuner_main
from tuner.shipped import resolve_space_path, shipped_space_names
from tuner.space import SearchSpace
from tuner.study import open_study

ROOT = Path(__file__).resolve().parent.parent


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err.strip()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- trainer ---------------------------------------------------------------------------------------


def test_trainer_config_prints_the_resolved_config_with_bare_and_set_overrides(capsys, tmp_path):
    assert trainer_main(["config", "default", "model.width=16", "--set", "optim.lr=0.002", "crops.local_crops=0"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"# resolved from {default_config_path()}")
    (tmp_path / "resolved.yaml").write_text(text)
    printed = TrainConfig.load(tmp_path / "resolved.yaml")
    expected = TrainConfig.load(None, ["model.width=16", "optim.lr=0.002", "crops.local_crops=0"])
    assert printed == expected
    assert (printed.model.width, printed.optim.lr, printed.crops.local_crops) == (16, 0.002, 0)
    assert printed.model.head.out_dim == 4096  # the rest is configs/default.yaml, every field spelled out
    assert set(yaml.safe_load(text)) == set(TrainConfig.model_fields)


def test_bare_and_set_overrides_give_the_same_config(capsys):
    assert trainer_main(["config", "--set", "model.head.out_dim=1024", "--set", "system.seed=3"]) == 0
    with_set = capsys.readouterr().out
    assert trainer_main(["config", "model.head.out_dim=1024", "system.seed=3"]) == 0
    assert capsys.readouterr().out.split("\n", 1)[1] == with_set.split("\n", 1)[1]  # the header names the overrides


def test_a_config_path_is_found_before_a_shipped_name(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    TrainConfig().with_overrides({"model.width": 8}).save(tmp_path / "default")  # a file called like the name
    assert trainer_main(["config", "default"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["width"] == 8


def test_a_misspelt_key_names_the_close_keys(capsys):
    assert trainer_main(["config", "model.head.outdim=3"]) == 2
    err = _one_error_line(capsys)
    assert "unknown field 'model.head.outdim'; allowed keys: bottleneck_dim, hidden_dim," in err
    assert err.endswith("; did you mean out_dim?")
    assert trainer_main(["config", "modle.width=3"]) == 2
    assert _one_error_line(capsys).endswith("; did you mean model?")


@pytest.mark.parametrize("args, expected", [
    # a checkout's configs/ may also hold the README's `tuner export speed -o configs/fast.yaml`
    (["config", "no-such-config"], "no-such-config: no such config file, and not a shipped config name "
                                   f"(shipped: {', '.join(packaged_config_names())})"),
    (["config", "a.yaml", "b.yaml"], "two configs given ('a.yaml' and 'b.yaml')"),
    (["train", "--epochs", "3"], "unrecognized option '--epochs'"),
    (["fly"], "error: trainer: argument command: invalid choice: 'fly'"),
])
def test_trainer_usage_mistakes_are_one_line_and_exit_2(args, expected, capsys):
    with pytest.raises(SystemExit) if args == ["fly"] else _no_exit() as info:
        code = trainer_main(args)
    code = info.value.code if args == ["fly"] else code
    assert code == 2
    assert expected in _one_error_line(capsys)


class _no_exit:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_binary_config_file_is_one_line_not_a_unicode_traceback(tmp_path, capsys):
    path = tmp_path / "photo.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    assert trainer_main(["train", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert _one_error_line(capsys) == f"error: {path}: not a UTF-8 text file (byte 0 is 0x89); expected a YAML file"
    assert not (tmp_path / "run").exists()


def test_help_shows_field_docs_and_exit_codes(capsys):
    with pytest.raises(SystemExit) as info:
        trainer_main(["config", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert '  model.head.out_dim [65536]  Prototypes (output dimension K).' in text
    assert "exit codes: 0 done; 1 the run or a measurement failed; 2 a usage or config mistake; 130 interrupted" in text


# ---- tuner -----------------------------------------------------------------------------------------


def test_a_misspelt_knob_or_section_in_a_space_names_the_close_ones(tmp_path, tiny_space):
    with pytest.raises(ConfigError, match=r"params\.crops\.local_crop: not a TrainConfig field \(e\.g\. .*\); "
                                          r"did you mean crops\.local_crops or crops\.global_crops or crops\.local_scale\?$"):
        SearchSpace.load(tiny_space(tmp_path, "typo", params={"crops.local_crop": {"choices": [0, 2]}}))
    with pytest.raises(ConfigError, match=r"unknown field 'budgets'; allowed keys: name, .*; did you mean budget\?$"):
        SearchSpace.load(tiny_space(tmp_path, "typo2", budgets={"n_trials": 3}))


def test_shipped_spaces_are_found_by_name():
    assert shipped_space_names() == ["gpu", "quality", "smoke", "speed"]
    assert resolve_space_path("smoke") == ROOT / "search_spaces" / "smoke.yaml"
    assert SearchSpace.load("smoke") == SearchSpace.load(ROOT / "search_spaces" / "smoke.yaml").model_copy(
        update={"source": str(ROOT / "search_spaces" / "smoke.yaml")})
    with pytest.raises(ConfigError, match=r"^fast: no such search space file, and not a shipped space name "
                                          r"\(shipped: gpu, quality, smoke, speed\)$"):
        resolve_space_path("fast")


@pytest.fixture
def kept_study(tmp_path, tiny_space, monkeypatch):
    """A study database that exists before the bad command; returns (space path, url, db path)."""
    monkeypatch.chdir(tmp_path)
    space = tiny_space(tmp_path, "kept")
    url = f"sqlite:///{tmp_path / 'kept.db'}"
    open_study(SearchSpace.load(space), url)
    return space, url, tmp_path / "kept.db"


@pytest.mark.parametrize("extra, expected", [
    (["--n-trials", "-3"], "error: tuner run: argument --n-trials: -3 must be a whole number above 0"),
    (["--n-trials", "0"], "error: tuner run: argument --n-trials: 0 must be a whole number above 0"),
    (["--timeout", "-5"], "error: tuner run: argument --timeout: -5 must be a number of seconds above 0"),
    (["--timeout", "soon"], "error: tuner run: argument --timeout: 'soon' is not a number of seconds"),
])
def test_negative_budgets_are_refused_before_any_database_is_touched(kept_study, extra, expected, capsys):
    space, url, db = kept_study
    before = _digest(db)
    with pytest.raises(SystemExit) as info:
        tuner_main(["run", str(space), "--storage", url] + extra)
    assert info.value.code == 2
    assert _one_error_line(capsys).startswith(expected)
    assert _digest(db) == before
    assert sorted(p.name for p in db.parent.iterdir() if p.suffix == ".db") == ["kept.db"]


@pytest.mark.parametrize("storage, expected", [
    ("notaurl", "error: --storage 'notaurl': not a database URL (e.g. sqlite:///studies/speed.db"),
    ("nosuchdb://host/x", "error: --storage 'nosuchdb://host/x': unknown database kind 'nosuchdb'"),
])
def test_malformed_storage_url_is_one_line_and_creates_nothing(kept_study, storage, expected, capsys):
    space, url, db = kept_study
    before = _digest(db)
    assert tuner_main(["run", str(space), "--storage", storage]) == 2
    assert _one_error_line(capsys).startswith(expected)
    assert _digest(db) == before
    assert not (db.parent / "studies").exists()  # the space's own default database was not created either


def test_python_run_refuses_negative_budgets_before_opening_the_study(kept_study):
    from tuner import run

    space, url, db = kept_study
    before = _digest(db)
    with pytest.raises(ConfigError, match=r"^n_trials=-3: must be above 0"):
        run(space, n_trials=-3, storage=url)
    with pytest.raises(ConfigError, match=r"^timeout_s=-5: must be above 0"):
        run(space, timeout_s=-5, storage=url)
    assert _digest(db) == before


def test_binary_search_space_is_one_line(tmp_path, capsys):
    path = tmp_path / "space.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert tuner_main(["run", str(path)]) == 2
    assert _one_error_line(capsys) == f"error: {path}: not a UTF-8 text file (byte 9 is 0xe9); expected a YAML file"
    assert not (tmp_path / "studies").exists()


def test_status_formats_table_json_and_csv_show_the_same_trials(stored_study, capsys):
    import csv
    import io
    import json

    from tuner.study import load
    from tuner.summary import summarize

    s = stored_study("fmt", choices={"crops.local_crops": [0, 2]})
    s.add("baseline", throughput=10.0, knn=50.0, params={"crops.local_crops": 2})
    s.add(throughput=25.0, knn=49.5, params={"crops.local_crops": 0})
    s.add(fail_reason="oom", params={"crops.local_crops": 0})
    assert tuner_main(["status", s.url, "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    expected = json.loads(json.dumps(summarize(load(s.url), s.url).to_dict(), default=str))
    assert data == expected
    assert data["n_trials"] == 3 and data["states"] == {"COMPLETE": 2, "FAIL": 1}
    assert data["best_feasible"]["number"] == 1 and data["best_feasible"]["speedup"] == 2.5
    assert tuner_main(["status", s.url, "-f", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["number"] for r in rows] == ["0", "1", "2"]
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE", "FAIL"]
    assert [r["throughput_img_s"] for r in rows] == ["10.0", "25.0", ""]
    assert [r["params_crops.local_crops"] for r in rows] == [str(t["params"]["crops.local_crops"]) for t in data["trials"]]
    assert rows[2]["fail_reason"] == "oom"
    assert tuner_main(["status", s.url]) == 0
    assert "best feasible: trial 1, 25.0 img/s, x2.50" in capsys.readouterr().out


def test_a_failed_confirm_or_explain_measurement_exits_1_and_stores_nothing(stored_study, capsys, monkeypatch):
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from trainer_tiny import tiny_config
    from tuner.study import load

    base = tiny_config(eval__at_start=False)
    s = stored_study("remeasure", choices={"crops.local_crops": [0, 2]})
    s.add("baseline", config=base.to_dict(), throughput=10.0, knn=50.0, params={"crops.local_crops": 2})
    s.add(config=base.with_overrides({"crops.local_crops": 0}).to_dict(), throughput=20.0, knn=50.0,
          params={"crops.local_crops": 0})
    monkeypatch.setenv("TRAINER_INJECT_FAULT", "oom@0")  # every re-measurement fails at its first step
    for command in ("confirm", "explain"):
        assert tuner_main([command, s.url, "--pick", "trial:1", "--rounds", "1"]) == 1, command
        err = capsys.readouterr().err
        assert err.startswith(f"{command}: a measurement failed: oom: ") and "Traceback" not in err, err
    attrs = load(s.url).user_attrs
    assert "confirm" not in attrs and "explain" not in attrs
