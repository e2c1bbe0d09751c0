"""Does a study's stated speedup reproduce? Export the winner and the baseline as a user would, run
`trainer bench` on each in fresh processes, alternating, and compare the measured ratio with the
speedup the export header states (the confirmed one where the study has it), both read as the confirmation
reads them: each config's best round. Prints a table; not a test.

    .venv/bin/python benchmarks/reproduce.py speed              # the study in studies/speed.db, 3 rounds
    .venv/bin/python benchmarks/reproduce.py speed --rounds 5

Target: within 15% of the stated speedup.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
from pathlib import Path

from common import trainer_bench
from trainer.table import format_table
from tuner.export import export
from tuner.remeasure import ratio_stats
from tuner.study import load


def bench(path: Path) -> float:
    """`trainer bench FILE --json` in a fresh process: its throughput."""
    return float(trainer_bench([str(path)])["throughput_img_s"])


def stated_speedup(header: str) -> tuple[float, str]:
    """The speedup an export header states: the confirmed one, else the study's."""
    confirmed = re.search(r"Confirmed speedup \(interleaved A/B, \d+ rounds\): x([0-9.]+)", header)
    if confirmed:
        return float(confirmed.group(1)), "confirmed"
    study = re.search(r"study speedup x([0-9.]+)", header)
    if not study:
        raise SystemExit("the export header states no speedup")
    return float(study.group(1)), "study (unconfirmed)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study", help="a study name (studies/<name>.db) or a storage URL")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pick", default="fastest")
    args = p.parse_args()
    study = load(args.study)
    folder = Path(tempfile.mkdtemp(prefix="reproduce-"))
    winner, header = export(study, args.pick, folder / "winner.yaml")
    baseline, _ = export(study, "trial:0", folder / "baseline.yaml")
    claim, kind = stated_speedup(header)
    rows, wins, bases = [], [], []
    for r in range(args.rounds):
        w, b = bench(winner), bench(baseline)
        wins.append(w)
        bases.append(b)
        rows.append((r + 1, w, b, f"{w / b:.2f}x"))
        print(f"round {r + 1}: winner {w:.1f} img/s, baseline {b:.1f} img/s, x{w / b:.2f}", file=sys.stderr, flush=True)
    measured, _, ratios = ratio_stats(wins, bases)  # the estimator the claim used: each config's best round
    print(format_table(["round", "winner img/s", "baseline img/s", "ratio"], rows))
    deviation = measured / claim - 1.0
    print(f"stated ({kind}): x{claim:.2f}; reproduced by trainer bench: x{measured:.2f} (best rounds: "
          f"{max(wins):.1f} / {max(bases):.1f} img/s; per-round ratios {', '.join(f'{x:.2f}' for x in ratios)}, "
          f"median x{statistics.median(ratios):.2f}); deviation {100 * deviation:+.0f}% "
          f"({'within' if abs(deviation) <= 0.15 else 'OUTSIDE'} 15%)")


if __name__ == "__main__":
    main()
