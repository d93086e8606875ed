"""CLS attention of the last block, computed from its ``attn.qkv`` weights (timm's fused attention returns no
weights), and DINO's top-mass thresholding."""
from __future__ import annotations

import torch

from sere_scale.models.backbone import ViTBackbone


@torch.no_grad()
def cls_attention(backbone: ViTBackbone, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Attention of the CLS query over the patch keys in the last block, per head.

    Returns ``(attn, out)``: ``attn`` (B, heads, h, w) — the CLS row of ``softmax(q kᵀ · scale)`` over all
    tokens, restricted to the patch columns (CLS and register columns dropped, as DINO shows it; rows then sum
    to less than 1) — and the backbone's forward output ``out``.
    """
    blocks = backbone.vit.blocks
    captured = {}
    handle = blocks[-1].register_forward_pre_hook(lambda mod, args: captured.__setitem__("x", args[0]))
    try:
        out = backbone(x)
    finally:
        handle.remove()
    blk = blocks[-1]
    a = blk.attn
    t = blk.norm1(captured["x"])
    B, N, _ = t.shape
    qkv = a.qkv(t).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    q, k = a.q_norm(qkv[0]), a.k_norm(qkv[1])  # (B, H, N, hd)
    logits = (q[:, :, :1] * a.scale) @ k.transpose(-2, -1)  # (B, H, 1, N)
    attn = logits.softmax(dim=-1)[:, :, 0, backbone.num_prefix:]
    h, w = out["grid"]
    return attn.reshape(B, a.num_heads, h, w), out


def top_mass_mask(attn: torch.Tensor, mass: float = 0.6) -> torch.Tensor:
    """DINO's threshold: per map (last two dims), keep the fewest largest patches whose share of the map's
    total attention reaches ``mass``. ``attn`` (..., h, w) → bool mask of the same shape."""
    shape = attn.shape
    a = attn.reshape(-1, shape[-2] * shape[-1]).float()
    val, idx = torch.sort(a, dim=1)  # ascending
    val = val / val.sum(dim=1, keepdim=True).clamp_min(1e-30)
    keep_sorted = torch.cumsum(val, dim=1) > (1 - mass)
    keep = torch.zeros_like(keep_sorted)
    keep.scatter_(1, idx, keep_sorted)
    return keep.reshape(shape)
