"""The configuration's schema: every section and key with its type and default (``config/load.py`` loads, merges,
overrides and validates it). docs and presets name these keys."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional


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
    # start from published or earlier weights (not a resume: step 0): timm:NAME, hf-hub:USER/REPO, local-dir:PATH,
    # a .safetensors/.pth file, or run:PATH[#teacher|#student] (heads too); models/init_from.py
    init_from: str = ""


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
    head_bn: bool = False  # DINO's use_bn_in_head: BatchNorm (synced across ranks) after the hidden layers
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 30
    center_momentum: float = 0.9
    # collapse guards (dinov2): the teacher's targets by a running center (DINO, iBOT) or Sinkhorn-Knopp
    # (losses/sinkhorn.py), and the KoLeo spreading term on the student's CLS (losses/koleo.py; 0: off)
    centering: Literal["center", "sinkhorn_knopp"] = "center"
    sinkhorn_iterations: int = 3
    koleo_weight: float = 0.0
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
    # collapse alarm (run/collapse.py), judged on the figures of the logged steps: warn (a loud warning, an
    # event in metrics.jsonl and the trackers), stop (also exit 4, resume point: the newest checkpoint from before
    # the collapse window) or ignore. A kind fires when its figure is beyond its threshold for collapse_window
    # logged steps in a row: uniform teacher_entropy >= collapse_uniform * ln K, one_hot teacher_entropy <=
    # collapse_one_hot * ln K (K = image_loss.out_dim; dino/ibot only), features feature_std <= collapse_feature_std
    on_collapse: Literal["warn", "stop", "ignore"] = "warn"
    collapse_window: int = 5
    collapse_uniform: float = 0.98
    collapse_one_hot: float = 0.02
    collapse_feature_std: float = 0.05
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
    dense_every: int = 0  # steps between nearest-neighbour segmentation probes of the teacher (0: off): dense_miou
    dense_train_path: str = ""  # segmentation data whose train split is the memory bank (VOC/ADE20K/Cityscapes/generic)
    dense_val_path: str = ""  # segmentation data whose val split is scored (default: dense_train_path)
    dense_size: int = 0  # short side of its images (0: eval_size)
    dense_memory_size: int = 10240  # patches in the memory bank
    dense_num_classes: int = 0  # generic layout (images/ + masks/) only: the number of classes
    dense_ignore_index: int = 255  # generic layout only: the label ignored


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
    tracking_uri: str = ""  # default: MLflow's own (MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the cwd)
    experiment: str = ""
    run_name: str = ""  # default: the output folder's name


@dataclass
class LogConfig:
    """Experiment trackers, rank 0 only (sere_scale/run/trackers.py); metrics.jsonl and TensorBoard always."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    hooks: list[str] = field(default_factory=list)  # generic trackers: "package.module:factory", factory(cfg)
    # a configured tracker that cannot start: "raise" (config error, exit 2, before anything is written) or "warn"
    tracker_errors: Literal["raise", "warn"] = "raise"


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
