"""Run metrics: one JSON object per logged step in ``metrics.jsonl`` and TensorBoard scalars (rank 0).

``metrics.jsonl`` is strict JSON: a non-finite figure (NaN, ±inf) is written as ``null`` and its key listed in
the record's ``"nonfinite"`` field, e.g. ``{"loss": null, ..., "nonfinite": ["loss"]}``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional


class MetricsLogger:
    def __init__(self, run_dir: str | Path, enabled: bool = True, resume_step: Optional[int] = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
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

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(strict_json(record) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
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


def read_metrics(run_dir: str | Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    return [r for ln in p.read_text().splitlines() if (r := _parse(ln)) is not None] if p.exists() else []
