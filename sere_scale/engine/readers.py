"""Reading the trained teacher of any backend's checkpoint in one process (no process group, any saving world
size): ``read_teacher_state(ckpt_dir)`` → the full fp32 teacher state dict (parameter names as the network's
``state_dict``). Each engine module defines the reader of its own format; ``TEACHER_READERS`` may add others
(backend name in the checkpoint's meta.json → ``reader(ckpt_dir)``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

TEACHER_READERS: dict[str, Callable[[Path], dict]] = {}


def _builtin_reader(backend: str) -> Callable[[Path], dict]:
    if backend == "ddp":
        from .ddp import read_ddp_teacher
        return read_ddp_teacher
    if backend == "fsdp":
        from .fsdp import read_fsdp_teacher
        return read_fsdp_teacher
    if backend == "deepspeed":
        from .deepspeed import read_deepspeed_teacher
        return read_deepspeed_teacher
    raise ValueError(f"checkpoint written by an unknown backend '{backend}' (known: ddp, fsdp, deepspeed"
                     + "".join(f", {k}" for k in sorted(TEACHER_READERS)) + ")")


def read_teacher_state(ckpt_dir: str | Path) -> dict:
    ckpt_dir = Path(ckpt_dir)
    meta = json.loads((ckpt_dir / "meta.json").read_text())
    backend = meta.get("backend", "ddp")
    reader = TEACHER_READERS.get(backend) or _builtin_reader(backend)
    return reader(ckpt_dir)
