"""The run folder's memory of its experiment-tracker runs: ``<output_dir>/trackers.json``.

One entry per tracker (``"wandb"``, ``"mlflow"``, ``"hook:<module:factory>"``): the tracker's own run id (W&B
``id``, MLflow ``run_id`` and tracking URI), written when the tracker first starts, and ``last_step``, the
highest step it was sent. ``--resume`` (a Slurm requeue, a torchrun restart) reads it, reopens the same tracker
runs and does not send a step again that a tracker already holds; a fresh start (``--move-old`` moves the
folder, file included, aside) begins with an empty memory, i.e. new tracker runs.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger("sere_scale")
FILE = "trackers.json"


class TrackerRuns:
    """``get(key)`` → that tracker's remembered fields (``{}`` when none); ``update(key, **fields)`` merges and
    rewrites the file atomically (the run folder must exist: called once training has started)."""

    def __init__(self, run_dir: str | Path, resume: bool):
        self.path = Path(run_dir) / FILE
        self.data: dict = {}
        if resume and self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except (OSError, ValueError) as e:
                log.warning("%s is unreadable (%s): the trackers start new runs", self.path, e)
            if not isinstance(self.data, dict):
                self.data = {}

    def get(self, key: str) -> dict:
        got = self.data.get(key)
        return dict(got) if isinstance(got, dict) else {}

    def update(self, key: str, **fields) -> None:
        self.data[key] = {**self.get(key), **fields}
        self.write()

    def write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.path)
