"""The ready search spaces shipped with the package, reachable by name (`tuner run smoke`) or by path.

In a source checkout they are `search_spaces/*.yaml` at the repository root; an installed wheel carries
the same files as package data in `tuner/search_spaces/` (pyproject.toml maps the one to the other).
"""

from __future__ import annotations

from pathlib import Path

from trainer.config import ConfigError


def _spaces_dir() -> Path:
    here = Path(__file__).resolve().parent
    inside = here / "search_spaces"
    return inside if inside.is_dir() else here.parent / "search_spaces"


def shipped_space_names() -> list[str]:
    """Names of the shipped search spaces (smoke, speed, quality)."""
    return sorted(p.stem for p in _spaces_dir().glob("*.yaml"))


def shipped_space_path(name: str) -> Path:
    """The file of the shipped space `name`."""
    return _spaces_dir() / f"{name}.yaml"


def resolve_space_path(ref: str | Path) -> Path:
    """`SPACE` as a user gives it: a YAML path, or a shipped space's name. A path that exists wins."""
    path = Path(ref)
    if path.exists() or path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        return path
    if str(ref) in shipped_space_names():
        return shipped_space_path(str(ref))
    raise ConfigError(f"{ref}: no such search space file, and not a shipped space name "
                      f"(shipped: {', '.join(shipped_space_names())})")
