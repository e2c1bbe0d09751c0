"""The `trainer` command: `trainer train` runs a config to its budget, `trainer bench` runs its speed phase,
`trainer config` prints a config as it would run, every default and override resolved."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from trainer.arguments import EXIT_CODES, OneLineParser, quiet_broken_pipe, split_config_and_overrides
from trainer.config import ConfigError, TrainConfig, field_reference, packaged_config_names, resolve_config_path
from trainer.table import format_table

_CONFIG_HELP = ("TrainConfig YAML, or the name of a shipped config ({names}); default: default. "
                "Then any KEY=VALUE overrides, e.g. model.head.out_dim=32768")
_SET_HELP = "override a field, e.g. --set model.head.out_dim=32768 (repeatable; a bare KEY=VALUE works too)"
_FIELDS_HINT = "fields: `trainer config --help` lists every field with its default; docs/config.md is the reference"


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="trainer", description="Train DINO from one YAML config, or measure its speed.",
                      epilog=EXIT_CODES)
    sub = p.add_subparsers(dest="command", required=True)
    config_help = _CONFIG_HELP.format(names=", ".join(packaged_config_names()))
    t = sub.add_parser("train", help="train a config (default: the embedded digits default) and evaluate kNN",
                       epilog=f"{_FIELDS_HINT}. {EXIT_CODES}.")
    t.add_argument("config", nargs="?", metavar="CONFIG [KEY=VALUE ...]", help=config_help)
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=_SET_HELP)
    t.add_argument("--out", type=Path, help="run folder for checkpoints, summary.json and log.jsonl (default: runs/<config>-<time>)")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out (default: the latest run of this config)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    b = sub.add_parser("bench", help="run only the measured speed phase and print the measurement",
                       epilog=f"{_FIELDS_HINT}. {EXIT_CODES}.")
    b.add_argument("config", nargs="?", metavar="CONFIG [KEY=VALUE ...]", help=config_help)
    b.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=_SET_HELP)
    b.add_argument("--json", action="store_true", help="print the measurement as JSON")
    q = sub.add_parser("parity", help="check that B trains exactly as A does (B differs only in exact or approximate knobs)",
                       description="Run N steps of A and of B from the same seed, data, augmentation and initial weights "
                       "and compare loss, gradient norms, weights, BatchNorm statistics and outputs, within a tolerance "
                       "measured on this machine. Exit 0: parity ok; 1: parity failed; 2: the pair cannot be compared.")
    q.add_argument("a", help="TrainConfig YAML of the reference run")
    q.add_argument("b", help="TrainConfig YAML of the run to check")
    q.add_argument("--steps", type=int, default=None, help="optimizer steps of each run (default 4)")
    q.add_argument("--seeds", type=int, default=3, help="seeds for the band of approximate knobs (bf16, fp16, tf32)")
    q.add_argument("--json", action="store_true", help="print the result as JSON")
    e = sub.add_parser("export-backbone", help="write a run's backbone with torchvision's key names (no fc)")
    e.add_argument("source", help="a run folder (holding checkpoint.pt) or a checkpoint file")
    e.add_argument("-o", "--output", type=Path, required=True, help="the state_dict file to write, e.g. backbone.pth")
    e.add_argument("--which", choices=("teacher", "student"), default="teacher", help="which backbone (default: teacher)")
    c = sub.add_parser("config", help="print the fully resolved config (YAML) a train or bench would run",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_fields_epilog())
    c.add_argument("config", nargs="?", metavar="CONFIG [KEY=VALUE ...]", help=config_help)
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=_SET_HELP)
    return p


def _fields_epilog() -> str:
    """Every TrainConfig field with its default and description, for `trainer config --help`."""
    lines = ["fields (KEY for --set or KEY=VALUE; default in brackets):"]
    for row in field_reference(TrainConfig):
        default = json.dumps(row["default"], default=str)
        lines.append(f"  {row['path']} [{default}]  {row['description']}".rstrip())
    return "\n".join(lines + ["", EXIT_CODES])


def main(argv: list[str] | None = None) -> int:
    """Entry point; user mistakes print one line and return 2, failed runs return 1."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if args.command == "parity":
            return _parity(args)
        if args.command == "export-backbone":
            return _export_backbone(args)
        if args.command in ("train", "bench", "config"):
            args.config, bare = split_config_and_overrides(([args.config] if args.config else []) + extra, args.command)
            args.overrides = args.overrides + bare
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        cfg = TrainConfig.load(args.config, args.overrides)
        if args.command == "config":
            print(cfg.to_yaml(header=f"resolved from {resolve_config_path(args.config)}"
                                     + (f" with {' '.join(args.overrides)}" if args.overrides else "")), end="")
            return 0
        if args.command == "bench":
            return _bench(cfg, args)
        return _train(cfg, args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return quiet_broken_pipe()


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _run_dir(args, cfg_path: Path) -> Path:
    if args.out is not None:
        return args.out
    stem = cfg_path.stem
    if args.resume:
        previous = sorted(Path("runs").glob(f"{stem}-*"))
        if not previous:
            raise ConfigError(f"--resume: no earlier run of {cfg_path} under runs/ (pass --out DIR)")
        return previous[-1]
    if "TORCHELASTIC_RUN_ID" in os.environ:  # every rank must agree on the folder
        return Path("runs") / f"{stem}-{os.environ['TORCHELASTIC_RUN_ID']}"
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def _train(cfg: TrainConfig, args) -> int:
    from trainer.engine import train
    from trainer.loss import collapse_note
    from trainer.warmstart import CHECKPOINT

    out = _run_dir(args, resolve_config_path(args.config))
    progress = _Progress(enabled=not args.quiet and _is_main_rank())
    if args.resume and not (out / CHECKPOINT).is_file():
        # A usage mistake changes nothing: no run folder is made, no config.yaml written.
        raise ConfigError(f"--resume: no checkpoint at {out / CHECKPOINT}")
    if _is_main_rank():
        print(f"training -> {out}" + (" (resuming)" if args.resume else ""), file=sys.stderr)
        out.mkdir(parents=True, exist_ok=True)
        if not args.resume:  # a resumed run keeps its config.yaml (the checkpoint must match it)
            cfg.save(out / "config.yaml")
    result = train(cfg, callback=progress, out_dir=out, resume=args.resume)
    progress.close()
    if not _is_main_rank():
        return 0 if result.status == "ok" else 1
    if result.status != "ok":
        f = result.failure
        print(f"training failed: {f['reason']}: {f['message']} (step {f['step']}); details in {out / 'summary.json'}", file=sys.stderr)
        return 1
    s = result.summary
    rows = [
        ("kNN top-1 (%)", s["knn_top1_initial"], s["knn_top1"]),
        ("kNN top-5 (%)", s["knn_top5_initial"], s["knn_top5"]),
        ("student kNN top-1 (%)", s["student_knn_top1_initial"], s["student_knn_top1"]),
        ("view agreement (teacher, 2 global views)", s["view_agreement_initial"], s["view_agreement"]),
    ]
    print(format_table(["metric", "before", "after"], rows))
    print(format_table(["measure", "value"], [
        ("throughput (img/s, speed phase)", s["throughput_img_s"]),
        ("throughput spread (max-min)/median", s["throughput_spread"]),
        ("training throughput (img/s)", s["train_throughput_img_s"]),
        (f"peak memory (MiB, {s['memory_kind']})", s["peak_memory_mb"]),
        ("steps", s["steps"]), ("epochs", s["epochs"]), ("wall time (s)", s["wall_s"]),
        ("teacher entropy (nats; ln K = uniform)",
         "-" if s["teacher_entropy"] is None else f"{s['teacher_entropy']:.2f} of {s['max_entropy']:.2f}"),
    ]))
    note = collapse_note(s["teacher_entropy"], s["batch_entropy"], s["max_entropy"])
    if note:
        print(f"note: {note}", file=sys.stderr)
    print(f"summary: {out / 'summary.json'}")
    return 0


def _bench(cfg: TrainConfig, args) -> int:
    from trainer.engine import train

    result = train(cfg, speed_only=True)
    if result.status != "ok":
        f = result.failure
        print(f"bench failed: {f['reason']}: {f['message']} (step {f['step']})", file=sys.stderr)
        return 1
    sp = result.speed.as_dict()
    if args.json:
        print(json.dumps(sp, indent=2))
        return 0
    print(format_table(["measure", "value"], [
        ("throughput (img/s, an epoch's start included)", sp["throughput_img_s"]),
        ("windows' median (img/s)", sp["window_throughput_img_s"]),
        ("epoch start (s, DataLoader workers)", "not measured (no workers)" if sp["epoch_start_s"] is None
         else sp["epoch_start_s"]),
        ("spread (max-min)/median", sp["throughput_spread"]),
        ("windows (img/s)", ", ".join(f"{w:.1f}" for w in sp["throughput_windows"])),
        ("data wait fraction", sp["data_wait_fraction"]),
        ("step (ms)", sp["step_ms"]),
        (f"peak memory (MiB, {sp['memory_kind']})", sp["peak_memory_mb"]),
        ("build (s)", sp["build_s"]), ("first step (s)", sp["first_step_s"]), ("compile (s)", sp["compile_s"]),
    ]))
    print(format_table(["phase", "ms/step", "share"], [
        (name, ms, f"{100 * ms / sp['step_ms']:.1f}%") for name, ms in sp["phases_ms"].items()
    ]))
    return 0


def _parity(args) -> int:
    from trainer.parity import DEFAULT_STEPS, QUANTITIES, check

    a, b = TrainConfig.load(args.a), TrainConfig.load(args.b)
    steps = DEFAULT_STEPS if args.steps is None else args.steps
    if steps < 1 or args.seeds < 1:
        raise ConfigError(f"--steps {steps} --seeds {args.seeds}: both must be at least 1")
    say = (lambda line: None) if args.json else (lambda line: print(line, file=sys.stderr))
    say(f"parity of {args.b} against {args.a}: {steps} steps each")
    result = check(a, b, steps=steps, seeds=args.seeds, progress=say, source=f"{args.a} vs {args.b}")
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0 if result.ok else 1
    print(format_table(["knob", "A", "B", "class"], [(k, *v) for k, v in result.knobs.items()] or [("(none)", "", "", "")]))
    print(format_table(["quantity", "max rel. diff", "tolerance", "of tolerance", "where"], [
        (q, f"{w['diff']:.2e}", f"{w['tolerance']:.2e}", f"{w['ratio']:.2f}", w["where"])
        for q, w in ((q, result.worst[q]) for q in QUANTITIES)]))
    print(f"tolerance: {result.tolerance_source}")
    print(f"{result.line()}  [{result.seconds:.1f} s on {result.device}]")
    return 0 if result.ok else 1
def _export_backbone(args) -> int:
    from trainer.warmstart import export_backbone

    info = export_backbone(args.source, args.output, args.which)
    print(f"wrote {info['tensors']} tensors of the {info['which']} backbone ({info['model']}, step {info['step']}) "
          f"with torchvision's key names -> {info['path']}")
    if info["torchvision_compatible"]:
        print("loads with strict=True into torchvision's model with fc = nn.Identity() (as DINO's evaluation sets it)")
    else:
        print(f"note: {info['model']} is not torchvision's shape (only resnet18/resnet50 at width 64 with the imagenet "
              f"stem are): torchvision's own model cannot load it; model.init of a config with the same model section can",
              file=sys.stderr)
    return 0


class _Progress:
    """A tqdm bar over optimizer steps with loss, throughput and ETA; evaluations printed above it."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None

    def __call__(self, event: str, payload: dict) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if event == "build":
            self.bar = tqdm(total=payload["total_steps"], unit="step", dynamic_ncols=True, file=sys.stderr)
        elif event == "log" and self.bar is not None:
            self.bar.update(payload["step"] - self.bar.n)
            self.bar.set_postfix(loss=f"{payload['loss']:.3f}", img_s=f"{payload['throughput_img_s']:.0f}",
                                 H=f"{payload['teacher_entropy'] / payload['max_entropy']:.2f}lnK")
        elif event == "eval":
            msg = (f"kNN at step {payload['step']}: top-1 {payload['knn_top1']:.1f}%, top-5 {payload['knn_top5']:.1f}% "
                   f"(student top-1 {payload['student_knn_top1']:.1f}%)")
            (self.bar.write if self.bar else print)(msg, file=sys.stderr)
        elif event == "speed":
            msg = f"speed phase: {payload['throughput_img_s']:.1f} img/s (spread {100 * payload['throughput_spread']:.0f}%), data wait {100 * payload['data_wait_fraction']:.0f}%"
            (self.bar.write if self.bar else print)(msg, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
