"""`log.jsonl` beside `summary.json`: the run as JSON lines, written while it goes (as DINO's `log.txt`).

One line per log step (once an epoch, or every 50 steps in longer epochs) with step, epoch, loss, lr,
teacher momentum, teacher entropy and throughput; one line per kNN evaluation with step, epoch, kNN
top-1/top-5 and view agreement (step 0: before training). A line is flushed as it is written, so
`pandas.read_json("log.jsonl", lines=True)` plots a run that is still training. A resumed run appends.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LOG = "log.jsonl"

_TRAIN_FIELDS = ("step", "epoch", "loss", "lr", "teacher_momentum", "teacher_entropy", "batch_entropy",
                 "max_entropy", "throughput_img_s")
_EVAL_FIELDS = ("step", "epoch", "knn_top1", "knn_top5", "view_agreement")


class RunLog:
    """Writes `log` and `eval` events of the loop to `path`, one JSON object per line."""

    def __init__(self, path: Path, append: bool = False):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if not append:
            path.write_text("")

    def __call__(self, event: str, payload: dict[str, Any]) -> None:
        fields = {"log": _TRAIN_FIELDS, "eval": _EVAL_FIELDS}.get(event)
        if fields is None:
            return
        line = {"kind": "train" if event == "log" else "eval", **{k: payload.get(k) for k in fields}}
        with self.path.open("a") as f:
            f.write(json.dumps(line, default=float) + "\n")
