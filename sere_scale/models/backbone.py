"""timm ViT backbone with an iBOT mask token, exposing CLS, normed patch tokens and pre-norm patch tokens."""
from __future__ import annotations

from typing import Optional

import timm
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..arch import VARIANTS, patch_size_of, timm_kwargs  # noqa: F401  (re-exported: the model's names)


def create_vit(mcfg, img_size: int, drop_path: float) -> nn.Module:
    name, kw = timm_kwargs(mcfg)
    try:
        return timm.create_model(name, pretrained=False, img_size=img_size, dynamic_img_size=True,
                                 drop_path_rate=drop_path, num_classes=0, **kw)
    except RuntimeError as e:  # unknown model name
        raise ValueError(f"config key 'model.arch': {e}") from e


class ViTBackbone(nn.Module):
    """Wraps a timm VisionTransformer. ``forward(x, mask)`` returns a dict with

    * ``cls``: (B, C) normed CLS token (input of the image-level head),
    * ``patch``: (B, N, C) normed patch tokens (iBOT patch head),
    * ``pre``: (B, N, C) patch tokens of the last block *before* the final norm (SERE relations),
    * ``grid``: (h, w) of the patch map.
    ``mask`` (B, h, w) bool replaces masked patch embeddings with the learnable mask token (iBOT).
    """

    def __init__(self, vit: nn.Module, mask_token: bool = False, checkpoint_activations: bool = False):
        super().__init__()
        self.vit = vit
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
        x = v._pos_embed(x)
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
