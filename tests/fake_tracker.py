"""A generic tracker hook for tests (``log.hooks=[tests.fake_tracker:recorder]``): appends every call it gets
to ``OUTPUT_DIR/tracker_calls_rank{RANK}.jsonl``. ``SERE_FAKE_TRACKER_SIGTERM_AT=N`` makes it send SIGTERM to
its own process when step N is logged (a preemption in the middle of a run); ``SERE_FAKE_TRACKER_EXIT_AT=N``
raises SystemExit there (the process ends without the loop's own close)."""
import json
import os
import signal
from pathlib import Path


class Recorder:
    def __init__(self, cfg):
        self.path = Path(cfg.output_dir) / f"tracker_calls_rank{os.environ.get('RANK', '0')}.jsonl"
        self.sigterm_at = int(os.environ.get("SERE_FAKE_TRACKER_SIGTERM_AT", "0"))
        self.exit_at = int(os.environ.get("SERE_FAKE_TRACKER_EXIT_AT", "0"))

    def _write(self, call: str, **kw):
        with self.path.open("a") as f:
            f.write(json.dumps({"call": call, **kw}, default=str) + "\n")

    def start(self, config, banner):
        self._write("start", config=config, banner=banner)

    def log(self, values, step):
        self._write("log", values=values, step=step)
        if step == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        if step == self.exit_at:
            raise SystemExit(5)

    def finish(self, exit_reason):
        self._write("finish", exit=exit_reason)


def recorder(cfg):
    return Recorder(cfg)


def calls(run_dir, rank=0) -> list:
    p = Path(run_dir) / f"tracker_calls_rank{rank}.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []
