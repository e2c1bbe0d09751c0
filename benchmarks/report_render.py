"""How long `tuner report` takes, and how large the page is, for a study of N trials.

Grows a study to N trials by re-adding the trials of a real study (params, attributes, configs and
states as stored) with their measured values jittered by up to +-10%, then times `write_report`.

    python benchmarks/report_render.py sqlite:///studies/speed.db --trials 50
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState, create_trial

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from trainer.table import format_table  # noqa: E402
from tuner.report import write_report  # noqa: E402
from tuner.study import load  # noqa: E402


def grown_study(source: optuna.Study, n: int, url: str) -> optuna.Study:
    rng = random.Random(0)
    study = optuna.create_study(study_name=f"{source.study_name}-x{n}", storage=url, directions=source.directions)
    for key, value in source.user_attrs.items():
        study.set_user_attr(key, value)
    trials = source.get_trials(deepcopy=False)
    for i in range(n):
        t = trials[i % len(trials)]
        jitter = 1.0 if i < len(trials) else rng.uniform(0.9, 1.1)
        values = [v * jitter for v in t.values] if t.values and t.state == TrialState.COMPLETE else None
        attrs = dict(t.user_attrs)
        if values and "throughput_img_s" in attrs:
            attrs["throughput_img_s"] = values[0]
        study.add_trial(create_trial(state=t.state, values=values, params=t.params, distributions=t.distributions,
                                     user_attrs=attrs, system_attrs=t.system_attrs,
                                     intermediate_values=t.intermediate_values))
    return study


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study", help="a real study (name or storage URL) to grow from")
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    source = load(args.study)
    with tempfile.TemporaryDirectory() as tmp:
        study = grown_study(source, args.trials, f"sqlite:///{tmp}/grown.db")
        out = Path(tmp) / "report.html"
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            write_report([study], out)
            times.append(time.perf_counter() - t0)
        size = out.stat().st_size
    print(format_table(["trials", "render s (median)", "render s (min-max)", "page MB"],
                       [(args.trials, statistics.median(times), f"{min(times):.2f}-{max(times):.2f}", size / 1e6)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
