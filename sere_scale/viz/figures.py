"""The three figures of ``sere-scale visualize`` for one image (layout sizes: ``draw.grid_size``).

* ``attention_figure``: the image, the mean over heads and each head's last-block CLS attention (colour from
  the map's minimum to its maximum) where the head's top ``mass`` share of attention lies, the image dimmed
  elsewhere (DINO's display);
  ``ceil((heads + 2) / max_cols)`` rows of ``min(heads + 2, max_cols)`` panels.
* ``relation_figure``: a first row with the image, both view boxes and their overlap; then per query point a
  row of 5 panels: view 1 and view 2 (overlap box in green, query cell ringed), the query's spatial relation
  row in view 1 and in view 2 (mean over heads, drawn on the image inside the overlap box, one shared colour
  scale) and their absolute difference on the same scale.
* ``channel_figure``: one row of 3 panels: the channel relation of view 1 and of view 2 (log scale, shared)
  and their absolute difference (linear, own scale).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from sere_scale.eval.features import eval_transform
from sere_scale.viz.attention import cls_attention, top_mass_mask
from sere_scale.viz.draw import compose, draw_box, draw_point, heat_image, overlay, tensor_to_pil
from sere_scale.eval.relations import row_tv, two_view_relations

VIEW_COLORS = ((255, 64, 64), (64, 128, 255))
OVERLAP_COLOR = (0, 220, 0)
DEFAULT_POINTS = ((0.5, 0.5), (0.2, 0.2), (0.8, 0.7))


def attention_layout(heads: int, max_cols: int = 7) -> tuple[int, int]:
    n = heads + 2
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


@torch.no_grad()
def attention_figure(backbone, img: Image.Image, size: int, panel: int = 160, mass: float = 0.6,
                     max_cols: int = 7) -> tuple[Image.Image, dict]:
    x = eval_transform(size)(img.convert("RGB"))
    attn, _ = cls_attention(backbone, x[None])
    attn = attn[0].float()
    keep = top_mass_mask(attn, mass)
    base = tensor_to_pil(x).resize((panel, panel), Image.BICUBIC)
    mean = attn.mean(0)
    panels = [(base, "image"), (overlay(base, _minmax(mean), keep=top_mass_mask(mean, mass).numpy()),
                                "mean of heads")]
    for h in range(attn.shape[0]):
        panels.append((overlay(base, _minmax(attn[h]), keep=keep[h].numpy()),
                       f"head {h}: {int(keep[h].sum())} patches"))
    rows, cols = attention_layout(attn.shape[0], max_cols)
    fig = compose([panels[r * cols:(r + 1) * cols] for r in range(rows)], panel)
    info = {"grid": list(attn.shape[1:]), "kept_patches": keep.flatten(1).sum(1).tolist(),
            "argmax": attn.flatten(1).argmax(1).tolist()}
    return fig, info


def _minmax(a: torch.Tensor) -> np.ndarray:
    a = a.double().numpy()
    span = a.max() - a.min()
    return (a - a.min()) / span if span > 0 else np.zeros_like(a)


def _to_view(box: Sequence[float], view_box: Sequence[float], flip: bool) -> list[float]:
    """An original-image box or point (x1, y1[, x2, y2]) in a view's normalised frame."""
    vx1, vy1, vx2, vy2 = view_box
    xs = [(box[i] - vx1) / (vx2 - vx1) for i in range(0, len(box), 2)]
    ys = [(box[i] - vy1) / (vy2 - vy1) for i in range(1, len(box), 2)]
    if flip:
        xs = [1 - u for u in xs][::-1]
    return [v for pair in zip(xs, ys) for v in pair]


def _on_region(base: Image.Image, values: np.ndarray, region: Sequence[float], vmax: float) -> Image.Image:
    """``values`` (S, S) coloured inside ``region`` of ``base``; the rest dimmed; the region framed."""
    W, H = base.size
    x1, y1, x2, y2 = (round(region[0] * W), round(region[1] * H), round(region[2] * W), round(region[3] * H))
    x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
    out = Image.eval(base, lambda p: int(p * 0.3))
    out.paste(overlay(base.crop((x1, y1, x2, y2)), values, vmax=vmax, alpha=0.75), (x1, y1))
    return draw_box(out, region, OVERLAP_COLOR, 1)


@torch.no_grad()
def relation_figure(backbone, img: Image.Image, views: dict, cfg, panel: int = 160,
                    points: Sequence[Sequence[float]] = DEFAULT_POINTS, heads: Optional[int] = None,
                    relation_size: Optional[int] = None, standardize: bool = True,
                    stats: Optional[tuple] = None) -> tuple[Image.Image, Image.Image, dict]:
    """(spatial relation figure, channel relation figure, numbers) for two overlapping ``views`` of ``img``
    (``eval.views.overlapping_views``); ``stats``: per-channel (mean, std) for ``standardize``."""
    img = img.convert("RGB")
    v = views
    heads = heads or cfg.sere.heads or backbone.num_heads
    S = relation_size or (v["crops"][0].shape[-1] // _patch(backbone))
    r = two_view_relations(backbone, (v["crops"][0][None], v["crops"][1][None]), v["boxes"][None],
                           v["flips"][None], S, heads, cfg.sere.tau_p, cfg.sere.tau_c, standardize, stats)
    if not bool(r["valid"][0]):
        raise ValueError("the two views do not overlap")
    region = r["region"][0].tolist()
    boxes, flips = v["boxes"].tolist(), [bool(f) for f in v["flips"]]
    A1, A2 = r["spatial"][0, 0], r["spatial"][1, 0]  # (M, S², S²)
    base = img.resize((panel, panel), Image.BICUBIC)
    head = draw_box(draw_box(draw_box(base, boxes[0], VIEW_COLORS[0]), boxes[1], VIEW_COLORS[1]), region,
                    OVERLAP_COLOR)
    rows = [[(head, "views: 1 red, 2 blue")]]
    view_imgs = [tensor_to_pil(c).resize((panel, panel), Image.BICUBIC) for c in v["crops"]]
    view_imgs = [draw_box(vi, _to_view(region, boxes[i], flips[i]), OVERLAP_COLOR)
                 for i, vi in enumerate(view_imgs)]
    per_point = []
    for px, py in points:
        qi, qj = min(int(py * S), S - 1), min(int(px * S), S - 1)
        q = qi * S + qj
        cx = region[0] + (qj + 0.5) / S * (region[2] - region[0])
        cy = region[1] + (qi + 0.5) / S * (region[3] - region[1])
        m1, m2 = A1[:, q].mean(0).reshape(S, S).numpy(), A2[:, q].mean(0).reshape(S, S).numpy()
        diff = np.abs(m1 - m2)
        vmax = float(max(m1.max(), m2.max()))
        tv = float(row_tv(A1[:, q], A2[:, q]).mean())
        row = []
        for i in range(2):
            name = f"view {i + 1}" + (" (flipped)" if flips[i] else "")
            row.append((draw_point(view_imgs[i], _to_view([cx, cy], boxes[i], flips[i])), name))
        for m, name in ((m1, "relation, view 1"), (m2, "relation, view 2"),
                        (diff, f"difference, TV {tv:.3f}")):
            row.append((draw_point(_on_region(base, m, region, vmax), (cx, cy)), name))
        rows.append(row)
        per_point.append({"point": [px, py], "cell": [qi, qj], "tv": tv})
    spatial_fig = compose(rows, panel)

    C1, C2 = r["channel"][0, 0].numpy(), r["channel"][1, 0].numpy()
    lo = float(np.log(np.minimum(C1.min(), C2.min()) + 1e-12))
    hi = float(np.log(np.maximum(C1.max(), C2.max()) + 1e-12))

    def logscale(a):
        return (np.log(a + 1e-12) - lo) / max(hi - lo, 1e-12)
    ch_tv = float(row_tv(r["channel"][0, 0], r["channel"][1, 0]).mean())
    cdiff = np.abs(C1 - C2)
    channel_fig = compose([[(heat_image(logscale(C1), (panel, panel), 1.0), "channels, view 1 (log)"),
                            (heat_image(logscale(C2), (panel, panel), 1.0), "channels, view 2 (log)"),
                            (heat_image(cdiff, (panel, panel)), f"difference, TV {ch_tv:.3f}")]], panel)
    sp_tv = float(row_tv(A1, A2).mean())
    info = {"boxes": boxes, "flips": flips, "region": region, "relation_size": S, "heads": heads,
            "spatial_tv": sp_tv, "channel_tv": ch_tv, "points": per_point}
    return spatial_fig, channel_fig, info


def _patch(backbone) -> int:
    return int(backbone.vit.patch_embed.patch_size[0])
