"""Write the pictures of ``sere-scale visualize``: per image ``<name>_attention.png``,
``<name>_relations.png`` and ``<name>_channels.png``, and ``index.json`` with the numbers behind them."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from sere_scale.data.folder import load_rgb
from sere_scale.eval.views import overlapping_views, parse_strength, view_maker
from sere_scale.viz.figures import DEFAULT_POINTS, attention_figure, relation_figure
from sere_scale.eval.relations import ChannelStats, view_tokens


def write_pictures(backbone, cfg, images: Sequence[str], out: str | Path, size: Optional[int] = None,
                   panel: int = 160, mass: float = 0.6, points: Sequence[Sequence[float]] = DEFAULT_POINTS,
                   strength="train", seed: int = 0, heads: Optional[int] = None,
                   relation_size: Optional[int] = None, standardize: bool = True) -> list[dict]:
    """Write the three figures of every readable image in ``images`` under ``out``; returns index records."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    size = int(size or cfg.data.global_size)
    strength = parse_strength(strength)
    backbone.eval()
    maker = view_maker(cfg, size, strength)
    items, used = [], set()
    for i, path in enumerate(images):
        img = load_rgb(str(path))
        if img is None:
            continue
        name = Path(path).stem
        if name in used:
            name = f"{name}_{i}"
        used.add(name)
        items.append((path, name, img, overlapping_views(maker, img, seed, i)))
    stats = None
    if standardize and items:  # per-channel statistics over both views of every pictured image
        acc = ChannelStats()
        for _, _, _, v in items:
            t1, t2, _ = view_tokens(backbone, (v["crops"][0][None], v["crops"][1][None]))
            acc.update(torch.cat([t1, t2]))
        stats = acc.mean_std()
    records = []
    for path, name, img, views in items:
        att, att_info = attention_figure(backbone, img, size, panel, mass)
        sp, ch, rel_info = relation_figure(backbone, img, views, cfg, panel, points, heads, relation_size,
                                           standardize, stats)
        files = {k: f"{name}_{k}.png" for k in ("attention", "relations", "channels")}
        for k, fig in (("attention", att), ("relations", sp), ("channels", ch)):
            fig.save(out / files[k], optimize=True)
        records.append({"image": str(path), "files": files, "attention": att_info, "relations": rel_info})
    (out / "index.json").write_text(json.dumps({"image_size": size, "mass": mass, "strength": strength,
                                                "images": records}, indent=1) + "\n")
    return records


def parse_points(items: Optional[Sequence[str]]) -> Sequence[Sequence[float]]:
    if not items:
        return DEFAULT_POINTS
    pts = []
    for it in items:
        try:
            x, y = (float(v) for v in it.split(","))
        except ValueError:
            raise ValueError(f"--points expects x,y pairs in [0, 1], got {it!r}") from None
        if not (0 <= x <= 1 and 0 <= y <= 1):
            raise ValueError(f"--points expects x,y pairs in [0, 1], got {it!r}")
        pts.append((x, y))
    return pts


def visualize_main(args) -> int:
    from sere_scale.eval.invariance import list_images
    from sere_scale.models.source import load_eval_backbone
    cfg, backbone = load_eval_backbone(args.checkpoint, args.timm_file, args.arch, args.random_init)
    if args.max_images and len(args.images) == 1:  # spread over a folder's classes
        images = list_images(args.images[0], args.max_images)
    else:
        images = [f for p in args.images for f in list_images(p)][:args.max_images]
    recs = write_pictures(backbone, cfg, images, args.out, args.size, args.panel, args.mass,
                          parse_points(args.points), args.strength, args.seed, args.heads, args.relation_size,
                          not args.no_standardize)
    print(f"wrote {3 * len(recs)} pictures of {len(recs)} images to {args.out}")
    return 0


def demo_report(run_dir: str | Path, val_dir: str | Path, n_images: int = 4, out: Optional[str | Path] = None,
                n_invariance: Optional[int] = None) -> dict:
    """The demo's last act: print the self-relation invariance of the trained teacher beside the same backbone
    at random init on ``val_dir``, and write the pictures of ``n_images`` validation images under
    ``run_dir/pictures`` (or ``out``). Returns the two invariance results."""
    from sere_scale.eval.invariance import list_images, measure_invariance
    from sere_scale.models.source import load_eval_backbone
    results = {}
    for name, rand in (("random-init", True), ("trained", False)):
        cfg, backbone = load_eval_backbone(str(run_dir), random_init=rand)
        results[name] = measure_invariance(backbone, list_images(val_dir, n_invariance), cfg, "train")
    print("\nSelf-relation invariance on the validation split (correlation distance between the relations of "
          "two augmented views; lower = more invariant; TV: total-variation distance of the softmaxes):")
    for name, r in results.items():
        print(f"  {name:12s} spatial {r['spatial']:.4f} (TV {r['spatial_tv']:.4f})"
              f"   channel {r['channel']:.4f} (TV {r['channel_tv']:.4f})")
    out = Path(out) if out else Path(run_dir) / "pictures"
    write_pictures(backbone, cfg, list_images(val_dir, n_images), out)
    print(f"pictures of {n_images} validation images (attention, spatial and channel relations): {out}")
    return results
