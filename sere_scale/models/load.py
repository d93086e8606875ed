"""Load a trained teacher from a run or checkpoint folder of any backend."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from ..checkpoint import find_latest
from ..config import config_from_dict
from .network import build_network

# backend name (meta.json) → function(ckpt_dir) returning the full teacher (student) state dict; engines
# register here.
TEACHER_READERS = {}
STUDENT_READERS = {}


def _read_ddp(ckpt_dir: Path) -> dict:
    return torch.load(ckpt_dir / "model.pt", map_location="cpu", weights_only=False)["teacher"]


def _read_ddp_student(ckpt_dir: Path) -> dict:
    return torch.load(ckpt_dir / "model.pt", map_location="cpu", weights_only=False)["student"]


TEACHER_READERS["ddp"] = _read_ddp
STUDENT_READERS["ddp"] = _read_ddp_student


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(checkpoint folder, run folder) from a run folder, its checkpoints/ folder, or a checkpoint folder."""
    p = Path(path)
    if (p / "meta.json").exists():
        return p, p.parent.parent
    ck = find_latest(p)
    if ck is None:
        raise FileNotFoundError(f"no complete checkpoint under '{p}'")
    return ck, ck.parent.parent


def load_run_config(run_dir: Path):
    f = run_dir / "config.yaml"
    if not f.exists():
        raise FileNotFoundError(f"'{f}' not found: cannot rebuild the model of this checkpoint")
    return config_from_dict(yaml.safe_load(f.read_text()))


def read_state(ckpt_dir: Path, weights: str = "teacher") -> dict:
    """The full state dict of the ``weights`` ("teacher" or "student") network of a checkpoint folder."""
    readers = {"teacher": TEACHER_READERS, "student": STUDENT_READERS}[weights]
    meta = json.loads((Path(ckpt_dir) / "meta.json").read_text())
    backend = meta.get("backend", "ddp")
    if backend not in readers:
        # engine modules register their reader on import
        import importlib
        importlib.import_module(f"sere_scale.engine.{backend}")
    return readers[backend](Path(ckpt_dir))


def read_teacher_state(ckpt_dir: Path) -> dict:
    return read_state(ckpt_dir, "teacher")


def load_teacher(path: str | Path, random_init: bool = False):
    """(config, teacher SERENet in eval mode on CPU) from a run or checkpoint folder."""
    ckpt_dir, run_dir = resolve_checkpoint(path)
    cfg = load_run_config(run_dir)
    torch.manual_seed(cfg.train.seed)
    net = build_network(cfg, teacher=True)
    if not random_init:
        net.load_state_dict(read_teacher_state(ckpt_dir))
    return cfg, net.eval()
