"""`docs/config.md`: a reference of every `TrainConfig` and `SearchSpace` field, generated from the models.

    python -m tuner.reference docs/config.md      # regenerate (tests/test_docs_config.py fails when stale)

The field descriptions, types, bounds and defaults live in the pydantic models; this renders them, so
the reference cannot drift from what the code validates. For `TrainConfig` it also shows the value in
the shipped `configs/default.yaml` wherever that differs from `TrainConfig()`.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from trainer.config import TrainConfig, field_reference

COMMAND = "python -m tuner.reference docs/config.md"


def reference_markdown() -> str:
    """The whole reference as Markdown."""
    from tuner.space import SearchSpace

    shipped = TrainConfig.load().to_dict()
    out = [
        "# Configuration reference",
        "",
        f"Generated from the pydantic models by `{COMMAND}`; do not edit by hand.",
        "",
        "## TrainConfig: one training run (`trainer train CONFIG`, `configs/*.yaml`)",
        "",
        _doc(TrainConfig),
        "",
        "Set any field from the command line as `--set PATH=VALUE` or a bare `PATH=VALUE` (the value is read",
        "as YAML). `trainer config [CONFIG] [PATH=VALUE ...]` prints the fully resolved config. The column",
        "`configs/default.yaml` shows the shipped default's value where it differs from `TrainConfig()` (blank:",
        "the same).",
        "",
    ]
    out += _sections(TrainConfig, shipped)
    out += [
        "## SearchSpace: one study (`tuner run SPACE`, `search_spaces/*.yaml`)",
        "",
        _doc(SearchSpace),
        "",
        "Knobs (`params`) and the `baseline` are keyed by `TrainConfig` paths (above), e.g.",
        "`crops.local_crops` or `model.head.out_dim`; `env.NAME` knobs set an environment variable of the trial.",
        "",
    ]
    out += _sections(SearchSpace, None)
    return "\n".join(out).rstrip() + "\n"


def _sections(model: type[BaseModel], shipped: dict[str, Any] | None) -> list[str]:
    rows = field_reference(model)
    out: list[str] = []
    top = [r for r in rows if "." not in r["path"]]
    order = list(dict.fromkeys(r["path"].split(".")[0] for r in rows))
    if top:
        out += ["### top level", ""] + _table(top, shipped) + [""]
    for section in order:
        inside = [r for r in rows if r["path"].startswith(section + ".") or (r["path"] == section and r["type"] == "section or null")]
        if not inside:
            continue
        field = model.model_fields[section]
        out += [f"### {section}", ""]
        intro = field.description or _doc(_section_class(model, section))
        if intro:
            out += [" ".join(intro.split()), ""]
        out += _table(inside, shipped) + [""]
    return out


def _section_class(model: type[BaseModel], section: str) -> Any:
    from trainer.config import _section_model

    return _section_model(model.model_fields[section].annotation)[0]


def _table(rows: list[dict[str, Any]], shipped: dict[str, Any] | None) -> list[str]:
    head = ["field", "type", "default"] + (["configs/default.yaml"] if shipped is not None else []) + ["description"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        default = "required" if r["required"] else _value(r["default"])
        cells = [f"`{r['path']}`", r["type"], default]
        if shipped is not None:
            value = _lookup(shipped, r["path"])
            cells.append("" if value == _plain(r["default"]) else f"**{_value(value)}**")
        cells.append(r["description"])
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _value(value: Any) -> str:
    return f"`{json.dumps(_plain(value))}`"


def _lookup(data: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _doc(obj: Any) -> str:
    return inspect.cleandoc(obj.__doc__ or "") if obj is not None else ""


def main(argv: list[str] | None = None) -> int:
    """Write the reference to the path given (default: print it)."""
    argv = sys.argv[1:] if argv is None else argv
    text = reference_markdown()
    if argv:
        Path(argv[0]).write_text(text)
        print(f"wrote {argv[0]}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
