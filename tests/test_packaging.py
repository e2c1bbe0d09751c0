"""The package installs anywhere: the wheel carries the shipped config and search spaces, and the
generated configuration reference in docs/ matches the models."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_carries_the_shipped_config_and_search_spaces(tmp_path):
    source = tmp_path / "src"  # a copy, so the build's own folders never land in the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "studies", "runs", "build",
                                                                "*.egg-info", "__pycache__", ".pytest_cache"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("dino_speed_tuner-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        shipped = {f"trainer/configs/{p.name}": p for p in (ROOT / "configs").glob("*.yaml")}
        shipped |= {f"tuner/search_spaces/{p.name}": p for p in (ROOT / "search_spaces").glob("*.yaml")}
        assert {"trainer/configs/default.yaml", "tuner/search_spaces/smoke.yaml", "tuner/search_spaces/speed.yaml",
                "tuner/search_spaces/quality.yaml"} <= set(shipped)
        for name, path in shipped.items():
            assert z.read(name) == path.read_bytes(), name
        assert {"trainer/cli.py", "tuner/cli.py", "trainer/engine.py", "tuner/runner.py"} <= names
        assert not any(n.startswith(("tests/", "benchmarks/", "docs/")) for n in names)
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "Requires-Dist: optuna<6,>=5.0" in metadata and "psutil" not in metadata
    assert "trainer = trainer.cli:main" in entry_points and "tuner = tuner.cli:main" in entry_points


def test_docs_config_md_is_generated_from_the_models_and_up_to_date():
    from tuner.reference import COMMAND, reference_markdown

    text = reference_markdown()
    assert (ROOT / "docs" / "config.md").read_text() == text, f"docs/config.md is stale: run `{COMMAND}`"
    # Every field of both models is in it, and the shipped default's differences are stated.
    from trainer.config import TrainConfig, field_reference
    from tuner.space import SearchSpace

    for row in field_reference(TrainConfig) + field_reference(SearchSpace):
        assert f"| `{row['path']}` |" in text, row["path"]
    assert "| `model.head.out_dim` | int >= 2 | `65536` | **`4096`** |" in text
    assert "| `budget.epochs` | int >= 1, <= 100000 | `10` | **`15`** |" in text
