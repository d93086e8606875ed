"""Merging and interpolation of configuration sources before the typed validation of :mod:`.config`.

Sources merge in order onto the defaults — several YAML files (``-c a.yaml -c b.yaml``: later files win, key by
key; a list is replaced as a whole), then ``key.sub=value`` overrides — and the merged tree is resolved by
OmegaConf (the convention Hydra users know): ``${oc.env:NAME}`` / ``${oc.env:NAME,default}`` read the
environment, ``${section.key}`` refers to another key of the merged config (defaults included). A value that
was an interpolation and resolves to a string is read as YAML when its key is not a string key
(``train.max_steps: ${oc.env:STEPS,100}`` gives an integer). Errors name the key.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

import yaml


def deep_merge(base: dict, top: dict) -> dict:
    """``top`` onto ``base``, recursively for mappings (a non-mapping value replaces)."""
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_yaml(path: str | Path, error) -> dict:
    p = Path(path)
    if not p.exists():
        raise error(f"config file '{p}' does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
        what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
        raise error(f"config file {where}: malformed YAML ({what})") from None
    if not isinstance(data, dict):
        raise error(f"config file '{p}' must hold a mapping of sections, got {type(data).__name__}")
    return data


def _has_interp(v: Any) -> bool:
    return isinstance(v, str) and "${" in v


def _hint(cls, parts: list[str]):
    """The type hint of a dotted key in the dataclass tree (None if unknown: the typed pass reports it)."""
    for i, p in enumerate(parts):
        if not dataclasses.is_dataclass(cls) or p not in {f.name for f in dataclasses.fields(cls)}:
            return None
        cls = typing.get_type_hints(cls)[p]
    return cls


def resolve(tree: dict, root_cls, error) -> dict:
    """``tree`` with every ``${...}`` resolved (OmegaConf); plain dicts/lists out."""
    reject_shell_vars(tree, error)
    if not _any_interp(tree):
        return tree
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    try:
        out = OmegaConf.to_container(OmegaConf.create(tree), resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "<root>"
        msg = str(e).splitlines()[0]
        if "Environment variable" in msg:
            msg += " (set it, or give a default: ${oc.env:NAME,default})"
        raise error(f"config key '{key}': {msg}") from None
    _decode(tree, out, root_cls, [])
    return out


_SHELL_VAR = re.compile(r"(?<![$\\])\$([A-Za-z_][A-Za-z0-9_]*)")  # $NAME, not ${...}


def reject_shell_vars(tree: dict, error, prefix: str = "") -> None:
    """``$NAME`` in a value is a shell variable the config would keep as literal text (and fail later, e.g. as
    a missing folder): an error naming the key and the interpolation that reads the environment."""
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            reject_shell_vars(v, error, key + ".")
            continue
        for item in v if isinstance(v, (list, tuple)) else [v]:
            m = _SHELL_VAR.search(item) if isinstance(item, str) else None
            if m:
                raise error(f"config key '{key}': {item!r} holds the shell variable ${m.group(1)}, which the config "
                            f"does not expand; write ${{oc.env:{m.group(1)}}} (or ${{oc.env:{m.group(1)},default}})")


def _any_interp(x) -> bool:
    if isinstance(x, dict):
        return any(_any_interp(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return any(_any_interp(v) for v in x)
    return _has_interp(x)


def _decode(orig: dict, out: dict, root_cls, prefix: list) -> None:
    """Interpolated strings become YAML values for non-string keys (environment values are strings)."""
    for k, v in orig.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            _decode(v, out[k], root_cls, prefix + [str(k)])
        elif _has_interp(v) and isinstance(out.get(k), str) and _hint(root_cls, prefix + [str(k)]) is not str:
            try:
                out[k] = yaml.safe_load(out[k]) if out[k] != "" else out[k]
            except yaml.YAMLError:
                pass
