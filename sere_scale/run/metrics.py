"""Run metrics (rank 0): one JSON object per logged step in ``metrics.jsonl`` (each with ``time``, Unix
seconds), TensorBoard scalars, and the experiment trackers of :mod:`.trackers`. A run (or resumed segment)
starts with one ``"event": "start"`` record holding the start-up banner (:mod:`.banner`); TensorBoard gets
the resolved config as text and, when the run finishes, an hparams record with the final figures. The collapse
alarm (:mod:`.collapse`) adds ``"event": "collapse"`` records.

``metrics.jsonl`` is strict JSON: a non-finite figure (NaN, ±inf) is written as ``null`` and its key listed in
the record's ``"nonfinite"`` field, e.g. ``{"loss": null, ..., "nonfinite": ["loss"]}``.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

from sere_scale.run.trackers import metric_names, scalars


class MetricsLogger:
    def __init__(self, run_dir: str | Path, enabled: bool = True, resume_step: Optional[int] = None,
                 trackers=None):
        from sere_scale.run.trackers import Trackers
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb, self.hparams, self.final, self.final_step = None, None, {}, 0
        self.trackers = trackers if enabled and isinstance(trackers, Trackers) else Trackers([])
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # drop lines logged after the checkpoint we resume from: the resumed run logs them again
            keep = [ln for ln in self.path.read_text().splitlines()
                    if (rec := _parse(ln)) is not None and rec.get("step", 0) <= resume_step]
            self.path.write_text("".join(k + "\n" for k in keep))
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step)
        except ImportError:  # tensorboard is a declared dependency; tolerate its absence anyway
            self.tb = None

    def start(self, banner: dict, config: dict) -> None:
        """The run's first record (the banner); the config to TensorBoard (text, hparams) and the trackers."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"event": "start", "step": (banner.get("resume") or {}).get("step", 0),
                                "time": time.time(), **banner}, default=str) + "\n")
        if self.tb is not None:
            import yaml

            from sere_scale.run.trackers import _flat
            text = yaml.safe_dump(config, sort_keys=False)
            self.tb.add_text("config", "\n".join("    " + ln for ln in text.splitlines()), 0)
            self.hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                            for k, v in _flat(config).items()}
        self.trackers.start(config, banner)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        if "time" not in record:  # wall clock, Unix seconds, right after the step
            record = {**({"step": record["step"]} if "step" in record else {}), "time": time.time(), **record}
        with self.path.open("a") as f:
            f.write(strict_json(record) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():  # non-finite values too (the trackers get finite ones only)
                if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(*metric_names({k: v}).popitem(), step)
        self.trackers.log(record)
        self.final.update(scalars(record))
        self.final_step = record.get("step", self.final_step)

    def event(self, record: dict, scalars: dict) -> None:
        """An ``"event"`` record (``record`` holds ``event`` and ``step``) in ``metrics.jsonl``; ``scalars`` (e.g.
        ``{"collapse": 1}``) to TensorBoard and the trackers at its step."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(strict_json({"step": record["step"], "time": time.time(), **record}) + "\n")
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"train/{k}", v, record["step"])
        self.trackers.log({"step": record["step"], **scalars})

    def close(self, exit_reason: str = "done") -> None:
        """Finish the trackers; a finished run (``done``) writes its TensorBoard hparams record with the final
        figures (``final/<key>``: each key's last value), one session of the HParams table per finish
        (``tb/hparams-step<N>``; written once, as the dashboard keeps a run's first record)."""
        self.trackers.finish(exit_reason)
        if self.tb is not None and exit_reason == "done" and self.hparams is not None and self.final:
            self.tb.add_hparams(self.hparams, {f"final/{k}": v for k, v in self.final.items()},
                                run_name=f"hparams-step{self.final_step}", global_step=self.final_step)
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _number(v):
    """A JSON-able number for floats, ints and 0-d tensors / numpy scalars; other values unchanged."""
    if isinstance(v, (bool, int, str)) or v is None:
        return v
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def strict_json(record: dict) -> str:
    """``record`` as one line of strict JSON: non-finite numbers become ``null``, their keys go in ``nonfinite``."""
    clean, bad = {}, []
    for k, v in record.items():
        v = _number(v)
        if isinstance(v, float) and not math.isfinite(v):
            clean[k] = None
            bad.append(k)
        else:
            clean[k] = v
    if bad:
        clean["nonfinite"] = bad
    return json.dumps(clean, allow_nan=False)


def _parse(line: str) -> Optional[dict]:
    """One record, or None for a blank line or one torn by a killed process."""
    if not line.strip():
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def read_metrics(run_dir: str | Path, events: bool = False) -> list[dict]:
    """The step records of ``metrics.jsonl`` (with ``events=True`` also the ``"event"`` records: start,
    collapse)."""
    p = Path(run_dir) / "metrics.jsonl"
    recs = [r for ln in p.read_text().splitlines() if (r := _parse(ln)) is not None] if p.exists() else []
    return recs if events else [r for r in recs if "event" not in r]
