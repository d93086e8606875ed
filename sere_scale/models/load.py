"""Load a trained teacher from a run or checkpoint folder of any backend.

``read_checkpoint`` is the one way every command reads a run folder (export, knn, linear, visualize, invariance,
the API's ``load_backbone``): the checks and the fallback of ``--resume`` (``engine/checkpoint.py:
read_first_good``: the sizes meta.json lists, unreadable files; a damaged newest checkpoint is skipped with a
warning naming it) and the step used logged. A checkpoint folder named explicitly is read without fallback: its
damage is an error naming it."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import yaml

from sere_scale.engine.checkpoint import read_checkpoint_folder, read_first_good, read_meta
from sere_scale.config.load import config_from_dict
from sere_scale.engine.readers import read_state, read_teacher_state
from sere_scale.models.network import build_network

__all__ = ["load_run_config", "load_teacher", "read_checkpoint", "read_state", "read_teacher_state",
           "resolve_checkpoint"]

log = logging.getLogger("sere_scale")


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(checkpoint folder, run folder) from a run folder, its checkpoints/ folder, or a checkpoint folder: the
    newest checkpoint whose files have the sizes meta.json lists (damaged newer ones skipped with a warning)."""
    p = Path(path)
    if (p / "meta.json").exists():
        return p, p.parent.parent
    found = read_first_good(p, _sizes_only)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint under '{p}'")
    ck = found[1]
    return ck, ck.parent.parent


def _sizes_only(ck: Path) -> None:
    return None


def read_checkpoint(path: str | Path, weights: str = "teacher") -> tuple[dict, Path, Path]:
    """(full state dict of the ``weights`` network, checkpoint folder, run folder) from a run folder, its
    checkpoints/ folder (the newest readable checkpoint) or one checkpoint folder; logs the step used."""
    p = Path(path)
    if (p / "meta.json").exists():
        state, ck = read_checkpoint_folder(p, lambda c: read_state(c, weights)), p
    else:
        found = read_first_good(p, lambda c: read_state(c, weights))
        if found is None:
            raise FileNotFoundError(f"no complete checkpoint under '{p}'")
        state, ck, _ = found
    log.info("read the %s of step %s from %s", weights, read_meta(ck).get("step", "?"), ck)
    return state, ck, ck.parent.parent


def load_run_config(run_dir: Path):
    f = run_dir / "config.yaml"
    if not f.exists():
        raise FileNotFoundError(f"'{f}' not found: cannot rebuild the model of this checkpoint")
    return config_from_dict(yaml.safe_load(f.read_text()))


def load_teacher(path: str | Path, random_init: bool = False):
    """(config, teacher SERENet in eval mode on CPU) from a run or checkpoint folder."""
    if random_init:
        state, run_dir = None, resolve_checkpoint(path)[1]
    else:
        state, _, run_dir = read_checkpoint(path, "teacher")
    cfg = load_run_config(run_dir)
    torch.manual_seed(cfg.train.seed)
    net = build_network(cfg, teacher=True)
    if state is not None:
        net.load_state_dict(state)
    return cfg, net.eval()
