"""Typed configuration: dataclasses loaded from YAML and overridden by ``key.sub=value`` arguments.

Every key is validated at load time; an unknown or mistyped key raises :class:`ConfigError` naming the key and
the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from sere_scale.config.ranges import check_ranges, check_sections
from sere_scale.config.resolve import _hint, deep_merge, read_yaml, resolve
from sere_scale.config.schema import (  # noqa: F401  (re-exported: the schema is part of config's API)
    ConfigError, ModelConfig, DataConfig, ImageLossConfig, SereConfig, OptimConfig, TrainConfig, CheckpointConfig,
    EngineConfig, EvalConfig, WandbConfig, MlflowConfig, LogConfig, Config, _to_plain,
)


# ----------------------------------------------------------------------------------------------- validation
def _all_keys(cls, prefix="") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            out += _all_keys(hint, prefix + f.name + ".")
        else:
            out.append(prefix + f.name)
    return out


def _unknown(key: str, cls) -> ConfigError:
    keys = _all_keys(Config)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not close:  # try the last component alone
        last = key.split(".")[-1]
        close = [k for k in keys if k.split(".")[-1] == last][:1] or difflib.get_close_matches(
            last, keys, n=1, cutoff=0.5
        )
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, hint) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"config key '{key}' expects {len(args)} values, got {len(value)}")
            return tuple(_coerce(key, v, a) for v, a in zip(value, args))
        return type(value)(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # PyYAML reads '1e-3' (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
        return float(value)
    if hint is str:
        if value is None:
            return ""
        if not isinstance(value, str):
            return str(value)
        return value
    return value


def _apply(obj, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in data.items():
        key = prefix + str(k)
        if k not in names:
            raise _unknown(key, type(obj))
        hint = hints[k]
        if dataclasses.is_dataclass(hint):
            _apply(getattr(obj, k), v, key + ".")
        else:
            setattr(obj, k, _coerce(key, v, hint))


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur[p] = {}
        cur = cur[p]
    cur[parts[-1]] = value
    return out


def validate(cfg: Config) -> Config:
    def req(cond, key, msg):
        if not cond:
            raise ConfigError(f"config key '{key}': {msg}")

    d, t = cfg.data, cfg.train
    req(d.n_global >= 2, "data.n_global", "at least 2 global crops are needed")
    req(d.n_local >= 0, "data.n_local", "must be >= 0")
    req(d.batch_size >= 1, "data.batch_size", "must be >= 1")
    req(d.num_workers >= 0, "data.num_workers", "must be >= 0 (0: load in the main process)")
    req(d.global_size >= 1 and d.local_size >= 1, "data.global_size" if d.global_size < 1 else "data.local_size",
        "must be >= 1")
    req(d.worker_timeout_s >= 0, "data.worker_timeout_s", "must be >= 0 (seconds; 0: no timeout)")
    for k in ("global_scale", "local_scale"):
        lo, hi = getattr(d, k)
        req(0 < lo <= hi <= 1, f"data.{k}", "needs 0 < low <= high <= 1")
    req(t.grad_accum >= 1, "train.grad_accum", "must be >= 1")
    req(t.max_steps is None or t.max_steps >= 0, "train.max_steps", "must be >= 0")
    req(t.epochs >= 1, "train.epochs", "must be >= 1")
    req(t.log_every >= 1, "train.log_every", "must be >= 1 (steps between metric records)")
    req(t.max_consecutive_skips >= 1, "train.max_consecutive_skips", "must be >= 1")
    req(t.collapse_window >= 1, "train.collapse_window", "must be >= 1 (logged steps in a row)")
    req(0 < t.collapse_uniform <= 1, "train.collapse_uniform", "must be in (0, 1] (a fraction of ln K)")
    req(0 <= t.collapse_one_hot < t.collapse_uniform, "train.collapse_one_hot",
        "must be in [0, train.collapse_uniform) (a fraction of ln K)")
    req(t.collapse_feature_std >= 0, "train.collapse_feature_std", "must be >= 0")
    req(cfg.sere.heads is None or cfg.sere.heads >= 1, "sere.heads",
        "must be >= 1 (leave it unset for the backbone's attention heads)")
    req(t.loss_scale_init >= 1 and math.frexp(t.loss_scale_init)[0] == 0.5, "train.loss_scale_init",
        "must be a power of 2, >= 1")
    req(t.loss_scale_window >= 1, "train.loss_scale_window", "must be >= 1")
    for k in ("hang_timeout_s", "dist_timeout_s"):
        req(math.isfinite(getattr(t, k)) and getattr(t, k) > 0, f"train.{k}", "must be a positive number of seconds")
    req(cfg.checkpoint.every_steps >= 1, "checkpoint.every_steps", "must be >= 1")
    req(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    req(cfg.engine.zero_stage in (1, 2, 3), "engine.zero_stage", "must be 1, 2 or 3")
    req(cfg.engine.fsdp_node_size >= 0, "engine.fsdp_node_size", "must be >= 0 (0: ranks per node)")
    req(cfg.sere.spatial_size_global >= 1, "sere.spatial_size_global", "must be >= 1")
    req(cfg.sere.spatial_size_local >= 1, "sere.spatial_size_local", "must be >= 1")
    lo, hi = cfg.image_loss.mask_ratio
    req(0 <= lo <= hi < 1, "image_loss.mask_ratio", "needs 0 <= low <= high < 1")
    req(0 <= cfg.image_loss.mask_prob <= 1, "image_loss.mask_prob", "must be in [0, 1]")
    req(cfg.optim.clip_grad >= 0, "optim.clip_grad", "must be >= 0")
    req(cfg.eval.knn_every >= 0, "eval.knn_every", "must be >= 0 (0: off)")
    req(cfg.eval.dense_every >= 0, "eval.dense_every", "must be >= 0 (0: off)")
    req(cfg.eval.dense_every == 0 or cfg.eval.dense_train_path, "eval.dense_train_path",
        "must be set when eval.dense_every > 0 (segmentation data: VOC, ADE20K, Cityscapes or images/ + masks/)")
    req(cfg.eval.dense_memory_size > 0, "eval.dense_memory_size", "must be > 0")
    req(cfg.eval.dense_size >= 0 and cfg.eval.dense_num_classes >= 0, "eval.dense_size",
        "eval.dense_size and eval.dense_num_classes must be >= 0 (0: default / a known layout)")
    for k in ("knn_train_path", "val_path"):
        req(cfg.eval.knn_every == 0 or getattr(cfg.eval, k), f"eval.{k}",
            "must be set when eval.knn_every > 0 (labelled image folder or shard spec)")
    check_ranges(cfg)  # the sense of every value (config/ranges.py)
    _check_arch(cfg.model.arch)
    return cfg


def validate_model(cfg: Config, embed_dim: int, num_heads: int, patch_size: int) -> None:
    """Checks that need the resolved model (width, attention heads, patch size); the training start-up runs them
    before anything is written to the run folder."""
    if cfg.data.global_size % patch_size:
        raise ConfigError(f"config key 'data.global_size': {cfg.data.global_size} is not a multiple of the patch "
                          f"size {patch_size}")
    m = cfg.sere.heads or num_heads
    if embed_dim % m:
        key = "sere.heads" if cfg.sere.heads else "model.num_heads"
        raise ConfigError(f"config key '{key}': {m} relation heads do not divide the backbone width {embed_dim}")



def _check_arch(arch: str) -> None:
    """``model.arch`` must be one of our named variants or a timm model name (a ``.tag`` suffix allowed)."""
    import timm

    from sere_scale.config.arch import VARIANTS
    if arch in VARIANTS or timm.is_model(arch.split(".")[0]):
        return
    close = difflib.get_close_matches(arch, [*VARIANTS, *timm.list_models("*vit*")], n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"config key 'model.arch': unknown model '{arch}' (a timm ViT name or one of "
                      f"{sorted(VARIANTS)}){hint}")


def load_config(path: Optional[str | Path | list | tuple] = None, overrides: list[str] | tuple = ()) -> Config:
    """Build a :class:`Config` from YAML files (none, one, or several merged in order) and ``key.sub=value``
    overrides, with ``${oc.env:NAME[,default]}`` / ``${section.key}`` interpolation (:mod:`.config_resolve`),
    typed and validated; nothing is written."""
    user: dict = {}
    for p in _paths(path):
        data = read_yaml(p, ConfigError)
        check_sections(data, Config, f"config file '{p}'")
        user = deep_merge(user, data)
    for item in overrides:
        key, value = parse_override(item)
        if _hint(Config, key.split(".")) is None:
            raise _unknown(key, Config)
        check_sections(_nest(key, value), Config, f"override '{item}'")
        user = deep_merge(user, _nest(key, value))
    full = resolve(deep_merge(Config().to_dict(), user), Config, ConfigError)
    cfg = Config()
    _apply(cfg, _restrict(full, user))
    return validate(cfg)


def _paths(path) -> list:
    if not path:
        return []
    return [path] if isinstance(path, (str, Path)) else [p for p in path if p]


def _restrict(full: dict, user: dict) -> dict:
    """The keys of ``user`` with their (resolved) values from ``full``."""
    return {k: _restrict(full[k], v) if isinstance(v, dict) and isinstance(full.get(k), dict) else full.get(k, v)
            for k, v in user.items()}


def config_from_dict(data: dict) -> Config:
    cfg = Config()
    _apply(cfg, data)
    return validate(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
