"""The sense of the configuration's values (``config/load.py: validate`` calls ``check_ranges``): every number is
finite, and every key with an obvious domain is in it — learning rates > 0 (``min_lr`` in [0, ``base_lr``]),
weight decays >= 0, probabilities and momenta in [0, 1], temperatures > 0, sizes and counts >= 1. A value out
of its domain raises ``ConfigError`` naming the key (exit code 2). ``check_sections`` refuses a section given as
anything but a mapping, in a YAML file or an override."""
from __future__ import annotations

import dataclasses
import math
import typing

from sere_scale.config.schema import ConfigError


def _req(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


def _finite_numbers(obj, prefix: str = "") -> None:
    """Every float (and every float of a tuple) of the config is finite."""
    for f in dataclasses.fields(obj):
        v, key = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(v):
            _finite_numbers(v, key + ".")
            continue
        for x in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(x, float) and not math.isfinite(x):
                raise ConfigError(f"config key '{key}': {v!r} is not a finite number")


def _positive(section, prefix: str, names: tuple, what: str = "must be > 0") -> None:
    for n in names:
        v = getattr(section, n)
        _req(v is None or v > 0, f"{prefix}.{n}", f"{what}, got {v!r}")


def _unit(section, prefix: str, names: tuple) -> None:
    for n in names:
        v = getattr(section, n)
        _req(0 <= v <= 1, f"{prefix}.{n}", f"must be in [0, 1], got {v!r}")


def check_ranges(cfg) -> None:
    _finite_numbers(cfg)
    o, il, s, m, e = cfg.optim, cfg.image_loss, cfg.sere, cfg.model, cfg.eval
    _req(o.base_lr > 0, "optim.base_lr", f"must be > 0, got {o.base_lr!r}")
    _req(o.min_lr >= 0, "optim.min_lr", f"must be >= 0, got {o.min_lr!r}")
    _req(o.min_lr <= o.base_lr, "optim.min_lr", f"{o.min_lr!r} is above optim.base_lr={o.base_lr!r} (the cosine "
                                                f"schedule decays from base_lr to min_lr)")
    for k in ("weight_decay", "weight_decay_end", "warmup_epochs", "freeze_last_layer"):
        _req(getattr(o, k) >= 0, f"optim.{k}", f"must be >= 0, got {getattr(o, k)!r}")
    _unit(o, "optim", ("momentum_teacher",))
    _req(all(0 <= b < 1 for b in o.betas), "optim.betas", f"AdamW betas must be in [0, 1), got {list(o.betas)}")
    _positive(il, "image_loss", ("student_temp", "teacher_temp", "warmup_teacher_temp", "teacher_patch_temp",
                                 "warmup_teacher_patch_temp", "moco_temp"), "a temperature must be > 0")
    _positive(il, "image_loss", ("out_dim", "hidden_dim", "bottleneck_dim", "moco_hidden_dim", "moco_out_dim"),
              "a size must be >= 1")
    _unit(il, "image_loss", ("center_momentum",))
    _req(il.warmup_teacher_temp_epochs >= 0, "image_loss.warmup_teacher_temp_epochs", "must be >= 0")
    _req(il.koleo_weight >= 0, "image_loss.koleo_weight", f"a loss weight must be >= 0, got {il.koleo_weight!r}")
    _req(il.sinkhorn_iterations >= 1, "image_loss.sinkhorn_iterations", f"must be >= 1, got {il.sinkhorn_iterations!r}")
    _req(il.koleo_weight == 0 or cfg.data.batch_size >= 2, "image_loss.koleo_weight",
         f"KoLeo needs data.batch_size >= 2 (a nearest neighbour in the rank's batch), got {cfg.data.batch_size}")
    _req(il.patch_weight >= 0, "image_loss.patch_weight", f"must be >= 0, got {il.patch_weight!r}")
    lo, hi = il.mask_aspect
    _req(0 < lo <= hi, "image_loss.mask_aspect", f"needs 0 < low <= high, got {list(il.mask_aspect)}")
    _positive(s, "sere", ("tau_p", "tau_c", "student_tau_p", "student_tau_c"), "a temperature must be > 0")
    for k in ("alpha", "beta", "w_image"):
        _req(getattr(s, k) >= 0, f"sere.{k}", f"a loss weight must be >= 0, got {getattr(s, k)!r}")
    _req(0 <= m.drop_path < 1, "model.drop_path", f"a probability in [0, 1), got {m.drop_path!r}")
    _positive(m, "model", ("patch_size", "embed_dim", "depth", "num_heads"), "a size must be >= 1 (or unset)")
    _positive(e, "eval", ("knn_k", "eval_size", "invariance_images"), "must be >= 1")
    _positive(e, "eval", ("knn_t",), "a temperature must be > 0")
    _req(e.invariance_every >= 0, "eval.invariance_every", "must be >= 0 (0: off)")


def check_sections(data, cls, where: str, prefix: str = "") -> None:
    """Every key of ``data`` (a YAML file's or an override's nested dict) that names a section of ``cls`` holds
    a mapping: a list or a scalar in place of a section is an error naming it (merged with an override on the
    same section, it would otherwise be replaced silently by the defaults)."""
    if not isinstance(data, dict):
        return
    hints = typing.get_type_hints(cls)
    for k, v in data.items():
        hint = hints.get(k)
        if hint is None or not dataclasses.is_dataclass(hint):
            continue
        if not isinstance(v, dict):
            raise ConfigError(f"config section '{prefix}{k}' in {where} must be a mapping of keys, got "
                              f"{type(v).__name__} {v!r}")
        check_sections(v, hint, where, f"{prefix}{k}.")
