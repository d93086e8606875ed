"""Box bookkeeping shared by the data and the spatial self-relation loss (the box contract of METHOD.md).

* A view's box is ``(x1, y1, x2, y2)`` normalised to [0, 1] in the original decoded image, before any flip.
* ``flip=True``: the crop was mirrored left-right after cropping; view-normalised ``u`` maps to original
  ``x = x1 + (1 - u)(x2 - x1)``.
* A feature map of h×w cells covers its view evenly, cell (i, j) centred at ((j + .5)/w, (i + .5)/h).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def overlap_boxes(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersection of boxes ``a`` and ``b`` (..., 4); ``valid`` is True where it has positive area."""
    x1 = torch.maximum(a[..., 0], b[..., 0])
    y1 = torch.maximum(a[..., 1], b[..., 1])
    x2 = torch.minimum(a[..., 2], b[..., 2])
    y2 = torch.minimum(a[..., 3], b[..., 3])
    valid = (x2 > x1) & (y2 > y1)
    return torch.stack([x1, y1, x2, y2], dim=-1), valid


def region_grid(view_boxes: torch.Tensor, flips: torch.Tensor, regions: torch.Tensor, size: int,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``grid_sample`` grid (B, size, size, 2) of the cell centres of ``regions`` in each view's frame
    (computed in fp32, or fp64 for fp64 features)."""
    vb, rg = view_boxes.to(dtype), regions.to(dtype)
    c = (torch.arange(size, device=vb.device, dtype=dtype) + 0.5) / size  # cell centres in [0, 1]
    xs = rg[:, 0:1] + c[None] * (rg[:, 2:3] - rg[:, 0:1])  # (B, S) original x, left→right
    ys = rg[:, 1:2] + c[None] * (rg[:, 3:4] - rg[:, 1:2])  # (B, S) original y, top→bottom
    u = (xs - vb[:, 0:1]) / (vb[:, 2:3] - vb[:, 0:1]).clamp_min(1e-12)
    v = (ys - vb[:, 1:2]) / (vb[:, 3:4] - vb[:, 1:2]).clamp_min(1e-12)
    u = torch.where(flips.to(torch.bool).reshape(-1, 1), 1.0 - u, u)
    gx = (2 * u - 1)[:, None, :].expand(-1, size, -1)
    gy = (2 * v - 1)[:, :, None].expand(-1, -1, size)
    return torch.stack([gx, gy], dim=-1)


def region_aligned_sample(features: torch.Tensor, view_boxes: torch.Tensor, flips: torch.Tensor,
                          regions: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinearly sample ``features`` (B, C, h, w) at the S×S cell centres of ``regions`` (B, 4).

    Returns (B, C, size, size); row r / column c is cell (r, c) of the region, top→bottom and left→right in the
    original image's orientation, so two views sampled on one region align element by element.

    The grid and the interpolation are fp32 (fp64 for fp64 features) for bf16/fp16 features too: a grid rounded
    to bf16 would misplace cells by up to 2^-9 of the view's width (fp16: 2^-12). The result has the dtype it
    would have with a plain ``grid_sample``: fp32 under autocast, otherwise the features' dtype.
    """
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    grid = region_grid(view_boxes, flips, regions, size, dtype)
    autocast = torch.is_autocast_enabled(features.device.type)
    with torch.autocast(features.device.type, enabled=False):
        out = F.grid_sample(features.to(dtype), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out if autocast else out.to(features.dtype)
