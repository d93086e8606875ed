"""Reading a trained network of any backend's checkpoint in one process (no process group, any saving world
size): ``read_state(ckpt_dir, "teacher" | "student")`` → its full fp32 state dict (parameter names as the
network's ``state_dict``); ``read_teacher_state(ckpt_dir)`` is the teacher's. Each engine module defines the
readers of its own format; ``TEACHER_READERS`` / ``STUDENT_READERS`` may add others (backend name in the
checkpoint's meta.json → ``reader(ckpt_dir)``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

TEACHER_READERS: dict[str, Callable[[Path], dict]] = {}
STUDENT_READERS: dict[str, Callable[[Path], dict]] = {}


def _builtin_reader(backend: str, weights: str) -> Callable[[Path], dict]:
    if backend == "ddp":
        from sere_scale.engine import ddp as mod
    elif backend == "fsdp":
        from sere_scale.engine import fsdp as mod
    elif backend == "deepspeed":
        from sere_scale.engine import deepspeed_readers as mod
    else:
        extra = sorted({*TEACHER_READERS, *STUDENT_READERS})
        raise ValueError(f"checkpoint written by an unknown backend '{backend}' (known: ddp, fsdp, deepspeed"
                         + "".join(f", {k}" for k in extra) + ")")
    return getattr(mod, f"read_{backend}_{weights}")


def read_state(ckpt_dir: str | Path, weights: str = "teacher") -> dict:
    """The full state dict of the ``weights`` ("teacher" or "student") network of a checkpoint folder."""
    if weights not in ("teacher", "student"):
        raise ValueError(f"weights must be 'teacher' or 'student', got {weights!r}")
    ckpt_dir = Path(ckpt_dir)
    meta = json.loads((ckpt_dir / "meta.json").read_text())
    backend = meta.get("backend", "ddp")
    extra = TEACHER_READERS if weights == "teacher" else STUDENT_READERS
    reader = extra.get(backend) or _builtin_reader(backend, weights)
    return reader(ckpt_dir)


def read_teacher_state(ckpt_dir: str | Path) -> dict:
    return read_state(ckpt_dir, "teacher")
