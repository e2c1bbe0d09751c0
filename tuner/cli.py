"""The `tuner` command: run, status, export, confirm, explain, report.

Exit codes as in every command of the project (`trainer.arguments.EXIT_CODES`): 0 done, 1 a run or a
measurement failed, 2 a usage or config mistake (one line, nothing changed), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from trainer.arguments import EXIT_CODES, OneLineParser, quiet_broken_pipe
from trainer.config import ConfigError
from tuner.remeasure import MeasurementFailed

_SPACE_EPILOG = ("A space's sections: name, base (the TrainConfig every trial starts from), baseline (today's "
                 "configuration), params (the knobs, by TrainConfig path), constraints (kNN tolerance, memory), "
                 "trial (what one trial measures), budget (trials, time), sampler, pruner (per phase), storage, "
                 "ray. docs/config.md lists every field; the shipped spaces are commented. ")


def _positive(kind: type, what: str):
    """An argparse type: a number of `kind` above zero, or a one-line usage error naming the value."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} must be {what} above 0")
        return value
    return parse


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="tuner", description="Find a faster DINO training config on this machine, by measuring.",
                      epilog=EXIT_CODES)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run or continue the study a search space describes", epilog=_SPACE_EPILOG + EXIT_CODES + ".")
    r.add_argument("space", help="search space YAML, or a shipped space's name: smoke, speed, quality")
    r.add_argument("--n-trials", type=_positive(int, "a whole number"),
                   help="trials in the study in all, baseline included (default: the space's budget)")
    r.add_argument("--timeout", type=_positive(float, "a number of seconds"), help="wall-clock limit of this run in seconds")
    r.add_argument("--address", help="run trials on an existing Ray cluster (e.g. auto, ray://host:10001)")
    r.add_argument("--storage", help="study database URL (default: the space's storage, sqlite:///studies/<name>.db)")
    r.add_argument("--confirm-rounds", type=int, default=3,
                   help="at the end, measure the winner against the baseline in this many interleaved rounds (0: skip)")
    for name, text in (("status", "trials by state, baseline, best feasible, Pareto set"),
                       ("export", "write a trial's complete TrainConfig YAML"),
                       ("confirm", "measure the picked trial and the baseline again, interleaved")):
        s = sub.add_parser(name, help=text, epilog=EXIT_CODES + ".")
        s.add_argument("study", help="a study name (studies/<name>.db) or a storage URL")
        s.add_argument("--study-name", help="which study, when the storage holds several")
        if name == "status":
            s.add_argument("-f", "--format", choices=["table", "json", "csv"], default="table",
                           help="table (default); json: the summary tuner.run() returns; csv: one row per trial")
        if name in ("export", "confirm"):
            s.add_argument("--pick", default="fastest", help="fastest (default), knee, or trial:N")
        if name == "export":
            s.add_argument("-o", "--output", type=Path, help="output YAML (default: studies/<name>-trial<N>.yaml)")
        if name == "confirm":
            s.add_argument("--address", help="measure on a node of this Ray cluster whose hardware matches the winner's")
            s.add_argument("--rounds", type=_positive(int, "a whole number"), default=3,
                           help="interleaved A/B rounds (default 3)")
            s.add_argument("--parity-steps", type=int, default=None,
                           help="optimizer steps of the winner's parity check (default 4; 0: skip it)")
    e = sub.add_parser("explain", help="measure the baseline-to-winner path one knob at a time", epilog=EXIT_CODES + ".")
    e.add_argument("study", help="a study name (studies/<name>.db) or a storage URL")
    e.add_argument("--study-name", help="which study, when the storage holds several")
    e.add_argument("--pick", default="fastest", help="fastest (default), knee, or trial:N")
    e.add_argument("--rounds", type=_positive(int, "a whole number"), default=3,
                   help="interleaved rounds over the path (default 3)")
    e.add_argument("--parity-steps", type=int, default=None,
                   help="optimizer steps of each knob's parity check (default 4; 0: skip parity)")
    e.add_argument("--address", help="measure on a node of this Ray cluster whose hardware matches the winner's")
    rp = sub.add_parser("report", help="write an offline HTML dashboard of one study, or overlay several",
                        epilog=EXIT_CODES + ".")
    rp.add_argument("studies", nargs="+", help="study names or storage URLs (several: one overlaid Pareto plot)")
    rp.add_argument("-o", "--output", type=Path, help="HTML file (default: studies/<name>/report.html)")
    rp.add_argument("--watch", type=float, metavar="SECONDS", help="rewrite the page every SECONDS while a study runs")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = _parser().parse_args(argv)
    warnings.filterwarnings("ignore", module="optuna")
    warnings.filterwarnings("ignore", category=FutureWarning)
    # More workers than cores is a knob the study measures on purpose; torch's advice would repeat per trial.
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    try:
        commands = {"run": _run, "status": _status, "export": _export, "confirm": _confirm, "explain": _explain,
                    "report": _report}
        return commands[args.command](args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MeasurementFailed as exc:
        print(f"{args.command}: a measurement failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; run the same command again to continue the study", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return quiet_broken_pipe()


def _run(args) -> int:
    from tuner.runner import run
    from tuner.space import SearchSpace
    from tuner.summary import format_status

    space = SearchSpace.load(args.space)  # fully validated before any database or Ray work
    if args.confirm_rounds < 0:
        raise ConfigError(f"--confirm-rounds {args.confirm_rounds}: must be 0 (skip) or more")
    summary = run(space, n_trials=args.n_trials, timeout_s=args.timeout, address=args.address, storage=args.storage,
                  progress=lambda line: print(line, flush=True), confirm_rounds=args.confirm_rounds)
    print()
    print(format_status(summary))
    return 0


def _status(args) -> int:
    from tuner.study import load, resolve_study
    from tuner.summary import format_status, summarize

    url, _ = resolve_study(args.study, args.study_name)
    summary = summarize(load(args.study, args.study_name), url)
    if args.format == "json":
        import json

        print(json.dumps(summary.to_dict(), indent=2, default=str))
    elif args.format == "csv":
        _write_trials_csv(summary, sys.stdout)
    else:
        print(format_status(summary))
    return 0


def _write_trials_csv(summary, out) -> None:
    """One row per trial, its knobs as `params_<path>` columns (as `optuna trials -f csv` names them)."""
    import csv
    from dataclasses import asdict, fields

    from tuner.summary import TrialRow

    rows = [asdict(t) for t in summary.trials]
    knobs = sorted({k for r in rows for k in r["params"]})
    columns = [f.name for f in fields(TrialRow) if f.name != "params"] + [f"params_{k}" for k in knobs]
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        params = r.pop("params")
        writer.writerow({**r, **{f"params_{k}": params.get(k) for k in knobs}})


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

    _check_parity_steps(args.parity_steps)
    confirm(load(args.study, args.study_name), args.pick, args.rounds, parity_steps=args.parity_steps,
            address=args.address)
    return 0


def _check_parity_steps(steps: int | None) -> None:
    if steps is not None and steps < 0:
        raise ConfigError(f"--parity-steps {steps}: must be 0 (skip parity) or more")


def _explain(args) -> int:
    from tuner.explain import explain, format_explain
    from tuner.study import load

    _check_parity_steps(args.parity_steps)
    record = explain(load(args.study, args.study_name), args.pick, args.rounds,
                     parity_steps=args.parity_steps, address=args.address)  # MeasurementFailed: exit 1
    print(format_explain(record))
    return 0


def _report(args) -> int:
    import time

    from tuner.report import default_report_path, watch, write_report
    from tuner.study import load

    def studies():
        return [load(ref) for ref in args.studies]

    loaded = studies()
    out = args.output or default_report_path(loaded)
    if args.watch:
        if args.watch < 1:
            raise ConfigError(f"--watch {args.watch}: must be at least 1 second")
        print(f"watching; open {out.resolve()} in a browser (it reloads itself); Ctrl-C to stop", file=sys.stderr)
        watch(studies, out, args.watch, echo=lambda line: print(line, file=sys.stderr))
        return 0
    t0 = time.perf_counter()
    write_report(loaded, out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
