"""What a model config names, without building anything: the timm name and constructor overrides of
``model.*`` and its patch size. Shared by the data pipeline (mask grid), models and export, so that data/ does
not import the model code."""
from __future__ import annotations

import re

# Named variants beyond timm's registry: (timm base name, constructor overrides).
VARIANTS = {
    "vit_tiny_cpu": ("vit_small_patch16_224", dict(patch_size=8, embed_dim=64, depth=4, num_heads=4)),
    "vit_small": ("vit_small_patch16_224", {}),
    "vit_base": ("vit_base_patch16_224", {}),
    "vit_large": ("vit_large_patch16_224", {}),
}


def timm_kwargs(mcfg) -> tuple[str, dict]:
    """The timm model name and keyword arguments a model config resolves to (also used by export)."""
    name, kw = VARIANTS.get(mcfg.arch, (mcfg.arch, {}))
    kw = dict(kw)
    for key in ("patch_size", "embed_dim", "depth", "num_heads"):
        if getattr(mcfg, key) is not None:
            kw[key] = getattr(mcfg, key)
    return name, kw


def patch_size_of(mcfg) -> int:
    name, kw = timm_kwargs(mcfg)
    if "patch_size" in kw:
        return int(kw["patch_size"])
    m = re.search(r"patch(\d+)", name)
    if not m:
        raise ValueError(f"cannot tell the patch size of model '{mcfg.arch}': set model.patch_size")
    return int(m.group(1))
