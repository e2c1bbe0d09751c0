"""What several benchmarks share: `trainer bench ... --json` in a fresh process, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys


def trainer_bench(args: list[str]) -> dict:
    """`python -m trainer bench ARGS --json` in a fresh process: the speed phase's report as a dict. A failed
    measurement ends the benchmark with the trainer's last line."""
    out = subprocess.run([sys.executable, "-m", "trainer", "bench", *args, "--json"], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"trainer bench {' '.join(args)} failed: "
                         f"{(out.stderr.strip().splitlines() or ['no message'])[-1]}")
    return json.loads(out.stdout)
