"""What several benchmarks share: the trainer's commands in a fresh process, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys


def run_trainer(args: list[str]) -> str:
    """`python -m trainer ARGS` in a fresh process: its standard output. A failed command ends the benchmark
    with the trainer's last line."""
    out = subprocess.run([sys.executable, "-m", "trainer", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"trainer {' '.join(args)} failed: {(out.stderr.strip().splitlines() or ['no message'])[-1]}")
    return out.stdout


def trainer_bench(args: list[str]) -> dict:
    """`python -m trainer bench ARGS --json` in a fresh process: the speed phase's report as a dict."""
    return json.loads(run_trainer(["bench", *args, "--json"]))
