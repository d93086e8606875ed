"""How much a backbone's self-relations change between two augmented views of the same image.

For every image: two views (``eval/views.py``), the spatial relations of both sampled on their overlap
region and the channel relations of both (``eval/relations.py``: METHOD.md's definitions on the pre-norm
features passed through the projection head h at its initial parameters — standardised per channel with
statistics over both views of all the images, then ReLU).

``spatial`` / ``channel``: the mean over rows of the correlation distance between matching rows of the two
views' relation scores (``row_corr_distance``: 1 − Pearson r over the off-diagonal entries; 0 for relations
that agree up to temperature, 1 for unrelated ones), over images whose views overlap, heads and rows
(spatial) or images and rows (channel). Lower = more invariant. It ignores how sharp the relations are:
training sharpens spatial relations, and a distance between softmaxes (``spatial_tv`` / ``channel_tv``: the
total-variation distance ``0.5·Σ_j |A1_ij − A2_ij|`` at the teacher's temperatures, also reported) grows with
sharpness for the same disagreement. ``*_unrelated``: the correlation distance between view 1 of each image and
view 2 of the next image of the set; ``*_ratio`` = related / unrelated.
"""
from __future__ import annotations

import json
import logging
import os
import weakref
from pathlib import Path
from typing import Optional

import torch

from sere_scale.data.evaldata import ShardImages, is_shard_spec, iter_rgb
from sere_scale.data.folder import IMG_EXT
from sere_scale.eval.relations import ChannelStats, row_corr_distance, row_tv, two_view_relations, view_tokens
from sere_scale.eval.views import make_views, parse_strength, view_maker

log = logging.getLogger("sere_scale")
MEASURE = "mean row correlation distance of the relation scores (1 - Pearson r, off-diagonal)"


def list_images(root: str | Path, limit: Optional[int] = None) -> list[str]:
    """Image files under ``root`` (recursively, sorted); the first ``limit`` of an evenly strided pass when
    ``limit`` is smaller than their number (every class of a class-sorted folder is represented)."""
    root = Path(root)
    if root.is_file():
        return [str(root)]
    if not root.is_dir():
        raise FileNotFoundError(f"image folder '{root}' does not exist")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                   if Path(f).suffix.lower() in IMG_EXT)
    if not files:
        raise ValueError(f"no images under '{root}'")
    if limit is not None and 0 < limit < len(files):
        step = len(files) / limit
        files = [files[int(i * step)] for i in range(limit)]
    return files


def relation_settings(cfg, backbone) -> dict:
    """Relation heads, temperatures and overlap grid size a config implies (the teacher's temperatures: the
    relations the student is trained to match)."""
    return {"heads": cfg.sere.heads or backbone.num_heads, "tau_p": cfg.sere.tau_p, "tau_c": cfg.sere.tau_c,
            "size": cfg.sere.spatial_size_global}


def eval_images(root, limit: Optional[int] = None, split: str = "val") -> list[str] | ShardImages:
    """The images to measure: :func:`list_images` of an image folder (or file), or an evenly strided selection
    of a shard spec's samples (``data/evaldata.py``: the rule telling them apart; ``_info.json`` specs without
    ``#SPLIT`` read ``split``)."""
    if is_shard_spec(root):
        return ShardImages(root, limit, split)
    return list_images(root, limit)


def _view_batches(images, maker, seed: int, batch_size: int, device):
    """(crops pair, boxes, flips) batches of the two views of every readable image, in order (``images``: image
    paths or a ``ShardImages``; the views of the k-th image are seeded by k)."""
    def flush(views):
        return (tuple(torch.stack([v["crops"][k] for v in views]).to(device) for k in range(2)),
                torch.stack([v["boxes"] for v in views]).to(device),
                torch.stack([v["flips"] for v in views]).to(device))

    views = []
    for k, img in enumerate(iter_rgb(images)):
        if img is not None:
            views.append(make_views(maker, img, seed, k))
        if (k + 1) % batch_size == 0 and views:
            yield flush(views)
            views = []
    if views:
        yield flush(views)


@torch.no_grad()
def measure_invariance(backbone, images, cfg, strength="train", image_size: Optional[int] = None,
                       batch_size: int = 32, seed: int = 0, standardize: bool = True,
                       device: str | torch.device = "cpu", per_image: bool = False) -> dict:
    """Mean correlation distance (and total-variation distance) between the two views' spatial and channel
    relations (see the module doc)."""
    strength = parse_strength(strength)
    size = int(image_size or cfg.data.global_size)
    rs = relation_settings(cfg, backbone)
    maker = view_maker(cfg, size, strength)
    was_training = backbone.training
    backbone.eval()
    try:
        stats = None
        if standardize:  # pass 1: per-channel statistics over both views of every image
            acc = ChannelStats()
            for crops, _, _ in _view_batches(images, maker, seed, batch_size, device):
                t1, t2, _ = view_tokens(backbone, crops)
                acc.update(torch.cat([t1, t2]))
            if acc.n == 0:
                raise ValueError("no readable images to measure invariance on")
            stats = acc.mean_std()
        acc = {k: [] for k in ("sp", "ch", "sp_tv", "ch_tv", "sp_x", "ch_x", "valid", "sp_heads")}
        last = None
        for crops, boxes, flips in _view_batches(images, maker, seed, batch_size, device):
            r = two_view_relations(backbone, crops, boxes, flips, rs["size"], rs["heads"], rs["tau_p"],
                                   rs["tau_c"], standardize, stats)
            sp = row_corr_distance(r["spatial_scores"][0], r["spatial_scores"][1]).mean(dim=-1).cpu()  # (B, M)
            acc["sp_heads"].append(sp)
            acc["sp"] += sp.mean(dim=1).tolist()
            acc["ch"] += row_corr_distance(r["channel_scores"][0], r["channel_scores"][1]).mean(-1).cpu().tolist()
            acc["sp_tv"] += row_tv(r["spatial"][0], r["spatial"][1]).mean(dim=(1, 2)).double().cpu().tolist()
            acc["ch_tv"] += row_tv(r["channel"][0], r["channel"][1]).mean(dim=-1).double().cpu().tolist()
            acc["valid"] += r["valid"].cpu().tolist()
            # unrelated pairs: view 1 of image k against view 2 of image k + 1 (across batch borders too)
            x = (r["spatial_scores"][0], r["channel_scores"][0], r["valid"])
            y = (r["spatial_scores"][1], r["channel_scores"][1], r["valid"])
            if last is None:
                x_k, y_k = tuple(t[:-1] for t in x), tuple(t[1:] for t in y)
            else:
                x_k, y_k = tuple(torch.cat([a, t[:-1]]) for a, t in zip(last, x)), y
            last = tuple(t[-1:] for t in x)
            ok = (x_k[2] & y_k[2]).cpu()
            acc["sp_x"] += row_corr_distance(x_k[0], y_k[0]).mean(dim=(1, 2)).cpu()[ok].tolist()
            acc["ch_x"] += row_corr_distance(x_k[1], y_k[1]).mean(dim=1).cpu().tolist()
    finally:
        backbone.train(was_training)
    n = len(acc["ch"])
    if n == 0:
        raise ValueError("no readable images to measure invariance on")
    valid = torch.tensor(acc["valid"], dtype=torch.bool)
    heads = torch.cat(acc["sp_heads"])[valid]
    n_valid = int(valid.sum())

    def mean(values, mask=None):
        v = values if mask is None else [x for x, ok in zip(values, mask) if ok]
        return sum(v) / len(v) if v else float("nan")

    res = {"spatial": float(heads.mean()) if n_valid else float("nan"), "channel": mean(acc["ch"])}
    res["spatial_unrelated"], res["channel_unrelated"] = mean(acc["sp_x"]), mean(acc["ch_x"])
    res["spatial_ratio"] = res["spatial"] / res["spatial_unrelated"] if acc["sp_x"] else float("nan")
    res["channel_ratio"] = res["channel"] / res["channel_unrelated"] if acc["ch_x"] else float("nan")
    res["spatial_tv"], res["channel_tv"] = mean(acc["sp_tv"], acc["valid"]), mean(acc["ch_tv"])
    per_head = heads.mean(dim=0).tolist() if n_valid else [float("nan")] * rs["heads"]
    res.update({"spatial_per_head": per_head, "n_images": n, "overlap_frac": n_valid / n,
                "strength": strength, "image_size": size, "standardize": standardize,
                "measure": MEASURE, **rs})
    if per_image:
        res["spatial_per_image"] = [v if ok else None for v, ok in zip(acc["sp"], acc["valid"])]
        res["channel_per_image"] = acc["ch"]
    return res


def invariance_main(args) -> int:
    from sere_scale.models.source import load_eval_backbone
    cfg, backbone = load_eval_backbone(args.checkpoint, args.timm_file, args.arch, args.random_init)
    if args.heads:
        cfg.sere.heads = args.heads
    if args.relation_size:
        cfg.sere.spatial_size_global = args.relation_size
    images = eval_images(args.data, args.max_images)
    res = measure_invariance(backbone, images, cfg, args.strength, args.size, args.batch_size, args.seed,
                             not args.no_standardize)
    res["checkpoint"] = str(args.checkpoint or args.timm_file)
    text = json.dumps(res)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


_HOOK_BACKBONES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def on_teacher_at(cfg, engine, step: int, every: int, info, teacher_state, measure) -> dict:
    """What every training-time evaluation hook does: at the first logged step at or after each multiple of
    ``every`` (> 0), gather the teacher's state on every rank (``teacher_state``, default
    ``engine.teacher_state_dict``: possibly collective), then on rank 0 alone return
    ``measure(backbone)`` for the teacher backbone, under ``torch.random.fork_rng`` so the model's random streams
    are left untouched; {} elsewhere and at other steps."""
    if every <= 0 or step % every >= cfg.train.log_every:
        return {}
    state = (teacher_state or engine.teacher_state_dict)()
    if not info.is_main:
        return {}
    with torch.random.fork_rng(devices=[]):
        return measure(hook_backbone(cfg, engine, state, info.device))


def hook_backbone(cfg, engine, state: dict, device):
    """A backbone (built once per engine, cached) holding the backbone part of the teacher ``state``; for the
    training-time hooks. Call it under ``torch.random.fork_rng``: building it draws initial weights."""
    backbone = _HOOK_BACKBONES.get(engine)
    if backbone is None:
        from sere_scale.models.backbone import ViTBackbone, create_vit
        backbone = ViTBackbone(create_vit(cfg.model, cfg.data.global_size, 0.0),
                               mask_token=cfg.image_loss.kind == "ibot", dino_pos_embed=cfg.model.dino_vit).to(device)
        _HOOK_BACKBONES[engine] = backbone
    prefix = "backbone."
    backbone.load_state_dict({k.split(prefix, 1)[1]: v for k, v in state.items() if prefix in k})
    return backbone


def invariance_during_training(cfg, engine, step: int, info, teacher_state=None) -> dict:
    """The training loop's hook (``eval.invariance_every`` > 0): at the first logged step at or after each
    multiple of ``invariance_every``, measure the teacher backbone's invariance on ``eval.invariance_images``
    images of ``eval.invariance_data`` (default ``eval.val_path``; a folder or a shard spec) and return
    ``invariance_*`` metrics (rank 0; other ranks get {}). Every rank must call it: gathering the teacher's
    weights may be collective; ``teacher_state`` (default ``engine.teacher_state_dict``) gathers it, so the
    loop can share one gather between hooks. The model's random streams are left untouched."""
    e = cfg.eval
    root = e.invariance_data or e.val_path

    def measure(backbone) -> dict:
        if not root:
            log.warning("eval.invariance_every is set but neither eval.invariance_data nor eval.val_path is")
            return {}
        res = measure_invariance(backbone, eval_images(root, e.invariance_images), cfg, "train",
                                 batch_size=cfg.data.batch_size, seed=cfg.train.seed, device=info.device)
        return {f"invariance_{k}": res[k] for k in ("spatial", "channel", "spatial_ratio", "channel_ratio",
                                                      "spatial_tv", "channel_tv")}
    return on_teacher_at(cfg, engine, step, e.invariance_every, info, teacher_state, measure)
