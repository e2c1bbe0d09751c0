"""The `tuner` command: run, status, export, confirm. User mistakes print one line and exit 2."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from trainer.config import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tuner", description="Find a faster DINO training config on this machine, by measuring.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run or continue the study a search space describes")
    r.add_argument("space", type=Path, help="search space YAML (e.g. search_spaces/speed.yaml)")
    r.add_argument("--n-trials", type=int, help="trials in the study in all, baseline included (default: the space's budget)")
    r.add_argument("--timeout", type=float, help="wall-clock limit of this run in seconds")
    r.add_argument("--address", help="run trials on an existing Ray cluster (e.g. auto, ray://host:10001)")
    r.add_argument("--storage", help="study database URL (default: the space's storage, sqlite:///studies/<name>.db)")
    for name, text in (("status", "trials by state, baseline, best feasible, Pareto set"),
                       ("export", "write a trial's complete TrainConfig YAML"),
                       ("confirm", "measure the picked trial and the baseline again, interleaved")):
        s = sub.add_parser(name, help=text)
        s.add_argument("study", help="a study name (studies/<name>.db) or a storage URL")
        s.add_argument("--study-name", help="which study, when the storage holds several")
        if name in ("export", "confirm"):
            s.add_argument("--pick", default="fastest", help="fastest (default), knee, or trial:N")
        if name == "export":
            s.add_argument("-o", "--output", type=Path, help="output YAML (default: studies/<name>-trial<N>.yaml)")
        if name == "confirm":
            s.add_argument("--rounds", type=int, default=3, help="interleaved A/B rounds (default 3)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = _parser().parse_args(argv)
    warnings.filterwarnings("ignore", module="optuna")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return {"run": _run, "status": _status, "export": _export, "confirm": _confirm}[args.command](args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to continue the study", file=sys.stderr)
        return 130


def _run(args) -> int:
    from tuner.runner import run
    from tuner.space import SearchSpace
    from tuner.summary import format_status

    space = SearchSpace.load(args.space)  # fully validated before any database or Ray work
    summary = run(space, n_trials=args.n_trials, timeout_s=args.timeout, address=args.address, storage=args.storage,
                  progress=lambda line: print(line, flush=True))
    print()
    print(format_status(summary))
    return 0


def _status(args) -> int:
    from tuner.study import load, resolve_study
    from tuner.summary import format_status, summarize

    url, _ = resolve_study(args.study, args.study_name)
    print(format_status(summarize(load(args.study, args.study_name), url)))
    return 0


def _export(args) -> int:
    from tuner.export import export
    from tuner.study import load

    path, header = export(load(args.study, args.study_name), args.pick, args.output)
    print(header)
    print(f"wrote {path}")
    return 0


def _confirm(args) -> int:
    from tuner.confirm import confirm
    from tuner.study import load

    confirm(load(args.study, args.study_name), args.pick, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
