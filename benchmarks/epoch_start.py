"""Does the speed phase's throughput hold for a whole training run? `trainer bench` against the epochs of
a real `trainer train`, for DataLoader workers started afresh each epoch and kept (persistent).

Not a test. Each round runs, in fresh processes, `trainer bench` (its windows' median, the epoch start it
measured, and its throughput with that start spread over an epoch) and then `trainer train` for
`--epochs` epochs without evaluations or checkpoints, whose later epochs (the second on) are the rate training really
runs at: a first epoch's workers start before any clock, and its head's last layer is frozen. Prints the
medians over the rounds and how far each speed figure sits from the later epochs' rate.

    .venv/bin/python benchmarks/epoch_start.py                    # the classic baseline, both worker kinds
    .venv/bin/python benchmarks/epoch_start.py --rounds 3 --epochs 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from common import run_trainer, trainer_bench
from trainer.measure import cpu_model
from trainer.table import format_table

CLASSIC = "crops.local_crops=8 model.head.out_dim=65536 model.head.hidden_dim=2048 optim.batch_size=64 system.num_workers=4"
CONFIGS = {
    "classic, 4 workers started each epoch": CLASSIC,
    "classic, 4 persistent workers": CLASSIC + " system.persistent_workers=true",
}
# No evaluations, and no checkpoint at each epoch's end (the classic model's is about 600 MB: time the run need
# not spend; the logged throughput leaves both out): the run's only checkpoint comes after its last epoch.
QUIET_RUN = ["eval.at_start=false", "eval.every_epochs=0", "eval.every_steps=0", "checkpoint_every_steps=1000000"]


def later_epochs(overrides: str, epochs: int) -> float:
    """`trainer train` for `epochs` epochs in a fresh process: the median images/s of its epochs after the first
    (wall time between the loop's per-epoch log lines, an epoch's start included)."""
    with tempfile.TemporaryDirectory(prefix="epoch-start-") as folder:
        run_trainer(["train", "default", *overrides.split(), *QUIET_RUN, f"budget.epochs={epochs}", "--out", folder, "--quiet"])
        lines = [json.loads(line) for line in (Path(folder) / "log.jsonl").read_text().splitlines()]
    per_epoch = [e["throughput_img_s"] for e in lines if e.get("kind") == "train"]
    if len(per_epoch) < 2:
        raise SystemExit(f"trainer train {overrides}: {len(per_epoch)} epoch logs; needs at least 2 epochs")
    return statistics.median(per_epoch[1:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3, help="epochs of each training run (at least 2)")
    args = p.parse_args(argv)
    print(f"CPU: {cpu_model()}; fresh processes, {args.rounds} rounds, {args.epochs}-epoch runs", flush=True)
    got: dict[str, list[tuple[float, float, float, float]]] = {label: [] for label in CONFIGS}
    for r in range(args.rounds):
        for label, overrides in CONFIGS.items():
            sp = trainer_bench(["default", *overrides.split()])
            real = later_epochs(overrides, args.epochs)
            got[label].append((sp["window_throughput_img_s"], sp["epoch_start_s"] or 0.0, sp["throughput_img_s"], real))
            print(f"  round {r + 1} {label}: windows {sp['window_throughput_img_s']:.1f}, epoch start "
                  f"{sp['epoch_start_s'] or 0.0:.2f} s, throughput {sp['throughput_img_s']:.1f}, later epochs {real:.1f} img/s",
                  file=sys.stderr, flush=True)
    rows = []
    for label, runs in got.items():
        win, start, tp, real = (statistics.median(col) for col in zip(*runs))
        rows.append((label, f"{win:.1f}", f"{start:.2f}", f"{tp:.1f}", f"{real:.1f}",
                     f"{100 * (win / real - 1):+.0f}%", f"{100 * (tp / real - 1):+.0f}%"))
    print(format_table(["config", "windows img/s", "epoch start s", "throughput img/s", "later epochs img/s",
                        "windows vs epochs", "throughput vs epochs"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
