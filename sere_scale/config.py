"""Typed configuration: dataclasses loaded from YAML and overridden by ``key.sub=value`` arguments.

Every key is validated at load time; an unknown or mistyped key raises :class:`ConfigError` naming the key and
the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .config_resolve import _hint, deep_merge, read_yaml, resolve


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


@dataclass
class ModelConfig:
    arch: str = "vit_small_patch16_224"  # any timm ViT name, or "vit_tiny_cpu" (tests, demo)
    patch_size: Optional[int] = None  # override timm's patch size (tiny variant: 8)
    embed_dim: Optional[int] = None  # overrides for custom sizes
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    drop_path: float = 0.1  # student only; the teacher has none
    checkpoint_activations: bool = False
    # The published DINO/iBOT ViT's details (the SERE presets set it): 96-px crops get the position grid
    # interpolated as DINO's interpolate_pos_encoding (bicubic, scale (n + 0.1)/N, no antialias) instead of
    # timm's antialiased resampling, and the CLS token starts from a truncated normal of std 0.02 (timm: 1e-6).
    # Off by default so run folders written before the key rebuild the model they trained.
    dino_vit: bool = False


@dataclass
class DataConfig:
    path: str = ""  # ImageNet-style folder (class sub-folders)
    shards: str = ""  # WebDataset shards (brace pattern, list file or _info.json)
    n_global: int = 2
    n_local: int = 10
    global_size: int = 224
    local_size: int = 96
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    photometric: bool = True
    batch_size: int = 64  # per rank, per micro-step
    num_workers: int = 8
    worker_timeout_s: float = 600.0  # longest wait for one batch from the loader workers (0: none); data/workers.py
    augment: Literal["cpu", "gpu"] = "cpu"
    crop_impl: Literal["fast", "pil"] = "fast"  # CPU multi-crop: FastMultiCrop (uint8 torch resize) or PIL


@dataclass
class ImageLossConfig:
    kind: Literal["ibot", "dino", "mocov3", "none"] = "ibot"
    out_dim: int = 8192  # prototypes K
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = False
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 30
    center_momentum: float = 0.9
    # iBOT masked image modelling
    mask_prob: float = 0.5  # probability that an image of a global view is masked at all
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    mask_aspect: tuple[float, float] = (0.3, 1 / 0.3)
    teacher_patch_temp: float = 0.07
    warmup_teacher_patch_temp: float = 0.04
    patch_weight: float = 1.0
    # MoCo v3 (kind: mocov3): projector 3-layer / predictor 2-layer MLP, InfoNCE temperature
    moco_hidden_dim: int = 4096
    moco_out_dim: int = 256
    moco_temp: float = 0.2


@dataclass
class SereConfig:
    alpha: float = 0.2  # weight of the spatial loss
    beta: float = 0.5  # weight of the channel loss
    w_image: float = 1.65  # weight of the image-level loss L_I
    heads: Optional[int] = None  # relation heads M (default: backbone attention heads)
    spatial_size_global: int = 13
    spatial_size_local: int = 6
    tau_p: float = 0.5  # teacher temperature, spatial (student 1.0)
    tau_c: float = 0.1  # teacher temperature, channel (student 1.0)
    student_tau_p: float = 1.0
    student_tau_c: float = 1.0
    share_local_heads: bool = False
    relation_impl: Literal["auto", "plain", "chunked", "triton"] = "auto"


@dataclass
class OptimConfig:
    base_lr: float = 5e-4  # lr = base_lr * global_batch / 256
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.996
    clip_grad: float = 0.3  # global norm; 0 disables
    freeze_last_layer: int = 1  # epochs
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class TrainConfig:
    epochs: int = 100
    max_steps: Optional[int] = None  # stop after this many optimizer steps (schedules still span `epochs`)
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 10
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # fp16 dynamic loss scaling, every engine: start at loss_scale_init (a power of 2), halve it and skip the
    # step when a gradient is inf/NaN, double it after loss_scale_window steps without one
    loss_scale_init: float = 65536.0
    loss_scale_window: int = 1000
    nonfinite: Literal["stop", "skip"] = "stop"
    max_consecutive_skips: int = 10  # nonfinite=skip: this many skipped steps in a row stop the run (exit 3)
    progress: bool = True
    log_mfu: bool = True  # count one step's FLOPs at start; log mfu and data_wait_pct
    # hang watchdog (watchdog.py): a rank that completes no optimiser step for this long dumps every thread's
    # stack and exits with code 125; the first step, evaluation hooks and checkpoint saves get 3x as long
    hang_timeout_s: float = 1800.0
    dist_timeout_s: float = 1800.0  # process-group timeout (collectives, rendezvous) of init_process_group


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep: int = 2


@dataclass
class EngineConfig:
    backend: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    zero_stage: int = 2  # deepspeed: ZeRO stage 1, 2 or 3
    fsdp_strategy: Literal["full", "grad_op", "hybrid"] = "full"
    fsdp_node_size: int = 0  # hybrid: ranks per shard group (one node); 0 = ranks per node from the launcher
    compile: bool = False  # torch.compile each transformer block in place (any device; first steps slow)
    deepspeed_config: str = ""  # a user JSON merged on top of the generated one


@dataclass
class EvalConfig:
    knn_k: int = 20
    knn_t: float = 0.07
    val_path: str = ""  # labelled validation images: image folder or shard spec (docs/EVAL.md)
    knn_every: int = 0  # steps between k-NN evaluations of the teacher during training (0: off)
    knn_train_path: str = ""  # their feature bank: labelled image folder or shard spec; queries: val_path
    eval_size: int = 224
    invariance_every: int = 0  # steps between self-relation invariance measurements of the teacher (0: off)
    invariance_data: str = ""  # image folder or shard spec for them (default: val_path)
    invariance_images: int = 64  # images per measurement


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "sere_scale"
    entity: str = ""  # team or user (default: wandb's default entity)
    name: str = ""  # run name (default: the output folder's name)
    mode: Literal["online", "offline", "disabled"] = "online"  # WANDB_MODE, if set, wins
    tags: list[str] = field(default_factory=list)


@dataclass
class MlflowConfig:
    enabled: bool = False
    tracking_uri: str = ""  # default: MLflow's own (MLFLOW_TRACKING_URI or ./mlruns)
    experiment: str = ""
    run_name: str = ""  # default: the output folder's name


@dataclass
class LogConfig:
    """Experiment trackers, rank 0 only (sere_scale/trackers.py); metrics.jsonl and TensorBoard always."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    hooks: list[str] = field(default_factory=list)  # generic trackers: "package.module:factory", factory(cfg)


@dataclass
class Config:
    output_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    image_loss: ImageLossConfig = field(default_factory=ImageLossConfig)
    sere: SereConfig = field(default_factory=SereConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))


def _to_plain(x):
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


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
    for k in ("knn_train_path", "val_path"):
        req(cfg.eval.knn_every == 0 or getattr(cfg.eval, k), f"eval.{k}",
            "must be set when eval.knn_every > 0 (labelled image folder or shard spec)")
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

    from .arch import VARIANTS
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
        user = deep_merge(user, read_yaml(p, ConfigError))
    for item in overrides:
        key, value = parse_override(item)
        if _hint(Config, key.split(".")) is None:
            raise _unknown(key, Config)
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
