"""timm ViT backbone with an iBOT mask token, exposing CLS, normed patch tokens and pre-norm patch tokens."""
from __future__ import annotations

from typing import Optional

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sere_scale.config.arch import VARIANTS, patch_size_of, timm_kwargs  # noqa: F401  (re-exported: the model's names)


def create_vit(mcfg, img_size: int, drop_path: float) -> nn.Module:
    """The timm ViT of a model config; with ``model.dino_vit`` its CLS token starts from a truncated normal of
    std 0.02 as in the published DINO/iBOT ViT (timm: a normal of std 1e-6)."""
    name, kw = timm_kwargs(mcfg)
    try:
        vit = timm.create_model(name, pretrained=False, img_size=img_size, dynamic_img_size=True,
                                drop_path_rate=drop_path, num_classes=0, **kw)
    except RuntimeError as e:  # unknown model name
        raise ValueError(f"config key 'model.arch': {e}") from e
    if getattr(mcfg, "dino_vit", False) and getattr(vit, "cls_token", None) is not None:
        with torch.no_grad():
            nn.init.trunc_normal_(vit.cls_token, std=0.02)
    return vit


def dino_pos_embed(pos_embed: torch.Tensor, num_prefix: int, old: tuple[int, int],
                   new: tuple[int, int]) -> torch.Tensor:
    """The position embedding (1, num_prefix + h·w, C) for an h×w patch grid, interpolated as the published
    DINO/iBOT ViT does (``interpolate_pos_encoding``): the grid as is at its own size, else bicubic
    ``F.interpolate`` with ``scale_factor = (n + 0.1) / N`` per axis (not recomputed from the output size, no
    antialiasing, align_corners=False); the prefix (CLS) embeddings kept apart. (DINO scales its first axis by
    the width: the same for the square crops it trains on; here each axis uses its own size.)"""
    old, new = (int(old[0]), int(old[1])), (int(new[0]), int(new[1]))
    if new == old:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    C = grid.shape[-1]
    grid = grid.float().reshape(1, old[0], old[1], C).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((new[0] + 0.1) / old[0], (new[1] + 0.1) / old[1]),
                         mode="bicubic", align_corners=False)
    if tuple(grid.shape[-2:]) != new:
        raise RuntimeError(f"position grid {old} interpolated to {tuple(grid.shape[-2:])}, expected {new}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], C).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


class ViTBackbone(nn.Module):
    """Wraps a timm VisionTransformer. ``forward(x, mask)`` returns a dict with

    * ``cls``: (B, C) normed CLS token (input of the image-level head),
    * ``patch``: (B, N, C) normed patch tokens (iBOT patch head),
    * ``pre``: (B, N, C) patch tokens of the last block *before* the final norm (SERE relations),
    * ``grid``: (h, w) of the patch map.
    ``mask`` (B, h, w) bool replaces masked patch embeddings with the learnable mask token (iBOT).
    ``dino_pos_embed``: grids other than the model's own (96-px local crops) get :func:`dino_pos_embed`'s
    interpolation instead of timm's antialiased resampling.
    """

    def __init__(self, vit: nn.Module, mask_token: bool = False, checkpoint_activations: bool = False,
                 dino_pos_embed: bool = False):
        super().__init__()
        self.vit = vit
        self.dino_pos_embed = dino_pos_embed and getattr(vit, "pos_embed", None) is not None
        self.embed_dim = vit.embed_dim
        self.num_heads = vit.blocks[0].attn.num_heads
        self.num_prefix = vit.num_prefix_tokens
        self.checkpoint_activations = checkpoint_activations
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, self.embed_dim)) if mask_token else None

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> dict:
        v = self.vit
        x = v.patch_embed(x)  # (B, h, w, C) with dynamic_img_size
        h, w = x.shape[1], x.shape[2]
        if self.mask_token is not None and mask is not None:
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        elif self.mask_token is not None:  # keep the parameter in the graph (DDP) at no cost
            x = x + 0 * self.mask_token.to(x.dtype)
        x = self._pos_embed_dino(x) if self.dino_pos_embed else v._pos_embed(x)
        x = v.patch_drop(x)
        x = v.norm_pre(x)
        for blk in v.blocks:
            if self.checkpoint_activations and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        pre = x[:, self.num_prefix:]
        x = v.norm(x)
        return {"cls": x[:, 0], "patch": x[:, self.num_prefix:], "pre": pre, "grid": (h, w)}

    def _pos_embed_dino(self, x: torch.Tensor) -> torch.Tensor:
        """timm's ``VisionTransformer._pos_embed`` with :func:`dino_pos_embed` as the resampling."""
        v = self.vit
        B, h, w, C = x.shape
        pos = dino_pos_embed(v.pos_embed, 0 if v.no_embed_class else v.num_prefix_tokens, v.patch_embed.grid_size,
                             (h, w))
        x = x.reshape(B, h * w, C)
        to_cat = [t.expand(B, -1, -1) for t in (v.cls_token, v.reg_token) if t is not None]
        if v.no_embed_class:
            x = torch.cat(to_cat + [x + pos], dim=1)
        else:
            x = torch.cat(to_cat + [x], dim=1) + pos
        return v.pos_drop(x)
