"""Load a trained teacher from a run or checkpoint folder of any backend."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from sere_scale.engine.checkpoint import find_latest
from sere_scale.config.load import config_from_dict
from sere_scale.engine.readers import read_state, read_teacher_state
from sere_scale.models.network import build_network

__all__ = ["load_run_config", "load_teacher", "read_state", "read_teacher_state", "resolve_checkpoint"]


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


def load_teacher(path: str | Path, random_init: bool = False):
    """(config, teacher SERENet in eval mode on CPU) from a run or checkpoint folder."""
    ckpt_dir, run_dir = resolve_checkpoint(path)
    cfg = load_run_config(run_dir)
    torch.manual_seed(cfg.train.seed)
    net = build_network(cfg, teacher=True)
    if not random_init:
        net.load_state_dict(read_teacher_state(ckpt_dir))
    return cfg, net.eval()
