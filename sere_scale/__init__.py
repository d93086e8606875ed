"""sere_scale: SERE self-supervised ViT pretraining at scale.

The public Python API (docs/API.md); everything not listed here is internal. Names are imported lazily, on
first use, so ``import sere_scale`` stays fast and pulls in neither torch nor DeepSpeed::

    import sere_scale
    cfg = sere_scale.load_config("configs/demo.yaml", ["output_dir=runs/x", "train.max_steps=100"])
    sere_scale.train(cfg)
    vit = sere_scale.load_backbone("runs/x")          # the EMA teacher's timm VisionTransformer
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {
    # configuration, training, weights
    "load_config": "sere_scale.config.load",
    "Config": "sere_scale.config.schema",
    "ConfigError": "sere_scale.config.schema",
    "Trainer": "sere_scale.run.trainer",
    "train": "sere_scale.run.train",
    "load_backbone": "sere_scale.models.source",
    "export_timm": "sere_scale.export.timm_dir",
    # the method and its parts
    "SEREMethod": "sere_scale.method.sere_method",
    "build_schedules": "sere_scale.method.schedules",
    "relation_cross_entropy": "sere_scale.kernels",
    "overlap_boxes": "sere_scale.geometry.boxes",
    "region_aligned_sample": "sere_scale.geometry.boxes",
    "DINOLoss": "sere_scale.losses.dino",
    "IBOTPatchLoss": "sere_scale.losses.ibot",
    "SpatialRelationLoss": "sere_scale.losses.sere",
    "ChannelRelationLoss": "sere_scale.losses.sere",
    "MoCoV3Loss": "sere_scale.losses.mocov3",
    # networks and heads
    "build_network": "sere_scale.models.network",
    "DINOHead": "sere_scale.models.heads",
    "RelationHeads": "sere_scale.models.heads",
    "SyncTokenBatchNorm": "sere_scale.models.heads",
    "MoCoV3Head": "sere_scale.models.mocov3_heads",
    # data: the augmentation recipe and its three multi-crop implementations, iBOT masks
    "AugmentRecipe": "sere_scale.data.recipe",
    "MultiCrop": "sere_scale.data.multicrop",
    "FastMultiCrop": "sere_scale.data.fastcrop",
    "GPUMultiCrop": "sere_scale.data.gpu_multicrop",
    "MaskGenerator": "sere_scale.data.masking",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'sere_scale' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
