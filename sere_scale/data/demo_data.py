"""The embedded real data sets, all drawn from scikit-learn's handwritten digits (1,797 labelled 8×8 images,
shipped inside the scikit-learn package):

* :func:`write_digits`: the digits upscaled, as an ImageNet-style folder (train/ and val/, one sub-folder per
  class): image-level pretraining and the k-NN / linear probes;
* :func:`write_scenes`: scenes of several digits on a cluttered background with per-pixel masks (semantic
  segmentation: 0 background, d + 1 for digit d) in the generic layout ``images/{train,val}/*.png`` +
  ``masks/{train,val}/*.png``;
* :func:`write_clips`: short clips of moving digits in the DAVIS 2017 layout (video object segmentation).

Scenes and clips draw train digits in train images and val digits in val images (the split of
:func:`write_digits`), are deterministic from their seed, and record where each digit went (``scenes.json``,
``clips.json``) so that tests can re-derive the masks.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

INK = 0.5  # a glyph pixel belongs to the digit's mask where its ink (0..1, resampled) exceeds this
# DAVIS's colour map for object ids 0 (background) .. 7; indexed annotation PNGs carry it
DAVIS_PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0, 0, 0, 128, 128, 0, 128, 0, 128, 128, 128, 128, 128]


def _load():
    from sklearn.datasets import load_digits
    d = load_digits()
    return d.images / 16.0, d.target


def digit_split(n: int, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Indices of the ``train`` and ``val`` digits (a seeded permutation of ``range(n)``, val first)."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(n * val_fraction)
    return {"val": order[:n_val], "train": order[n_val:]}


def write_digits(out: str | Path, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write ``out/train/<digit>/*.png`` and ``out/val/<digit>/*.png``; returns ``out``. Idempotent."""
    out = Path(out)
    done = out / ".complete"
    if done.exists():
        return out
    images, target = _load()
    for split, idx in digit_split(len(target), val_fraction, seed).items():
        for i in idx:
            img = (images[i] * 255).astype(np.uint8)
            pil = Image.fromarray(img, mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
            folder = out / split / f"digit_{target[i]}"
            folder.mkdir(parents=True, exist_ok=True)
            pil.save(folder / f"{i:05d}.png")
    done.write_text("ok\n")
    return out


def glyph(image8: np.ndarray, size: int) -> np.ndarray:
    """The ink (size, size) float32 in [0, 1] of an 8×8 digit image (values 0..1), bicubic upscaled."""
    g = Image.fromarray(image8.astype(np.float32), mode="F").resize((size, size), Image.BICUBIC)
    return np.clip(np.asarray(g), 0.0, 1.0)


def clutter_background(rng, size: int, n_clutter: int, noise: float = 0.08) -> np.ndarray:
    """A (size, size) grey background in [0, 1]: a random mid-dark level, pixel noise of std ``noise`` and
    ``n_clutter`` random rectangles (filled or outlined) and straight strokes dimmer than the digits' ink."""
    bg = np.full((size, size), rng.uniform(0.05, 0.3), np.float32)
    for _ in range(n_clutter):
        v = rng.uniform(0.15, 0.5)
        if rng.random() < 0.5:
            x0, y0 = rng.integers(0, size - 4, 2)
            w, h = rng.integers(4, max(5, size // 2), 2)
            if rng.random() < 0.5:
                bg[y0:y0 + h, x0:x0 + w] = v
            else:
                bg[y0:y0 + h, [x0, min(x0 + w, size) - 1]] = v
                bg[[y0, min(y0 + h, size) - 1], x0:x0 + w] = v
        else:
            (x0, y0), (x1, y1) = rng.uniform(0, size, 2), rng.uniform(0, size, 2)
            t = np.linspace(0, 1, 2 * size)
            bg[np.clip((y0 + t * (y1 - y0)).astype(int), 0, size - 1),
               np.clip((x0 + t * (x1 - x0)).astype(int), 0, size - 1)] = v
    bg += rng.normal(0, noise, bg.shape).astype(np.float32)
    return np.clip(bg, 0, 1)


def _paste(canvas, mask, ink, x, y, value, fg):
    """Blend ``ink`` (s, s) at (x, y) into ``canvas`` with foreground grey ``fg``; ``mask`` gets ``value`` where
    the ink exceeds :data:`INK`."""
    s = ink.shape[0]
    region = canvas[y:y + s, x:x + s]
    canvas[y:y + s, x:x + s] = ink * fg + (1 - ink) * region
    mask[y:y + s, x:x + s][ink > INK] = value


def _place(rng, size, sizes, placed, tries=50):
    """(x, y) of a box of side ``sizes`` inside the frame, overlapping none of ``placed`` (x, y, s); None if none
    found in ``tries`` draws."""
    for _ in range(tries):
        x, y = (int(v) for v in rng.integers(0, size - sizes + 1, 2))
        if all(x + sizes <= px or px + ps <= x or y + sizes <= py or py + ps <= y for px, py, ps in placed):
            return x, y
    return None


def _scene(rng, images, target, pool, size, n_digits, digit_size, n_clutter):
    """One scene: a cluttered background with 2-3 non-overlapping digits of ``pool`` at random scales and
    places. Returns (RGB uint8 image, L mask: 0 background, d + 1 under digit d's ink, digits record)."""
    canvas = clutter_background(rng, size, n_clutter)
    mask = np.zeros((size, size), np.uint8)
    placed, digits = [], []
    for _ in range(int(rng.integers(n_digits[0], n_digits[1] + 1))):
        s = int(rng.integers(digit_size[0], digit_size[1] + 1))
        xy = _place(rng, size, s, placed)
        if xy is None:
            continue
        i = int(rng.choice(pool))
        _paste(canvas, mask, glyph(images[i], s), *xy, int(target[i]) + 1, rng.uniform(0.8, 1.0))
        placed.append((*xy, s))
        digits.append({"index": i, "label": int(target[i]) + 1, "x": xy[0], "y": xy[1], "side": s})
    return (np.repeat(canvas[..., None], 3, axis=2) * 255).round().astype(np.uint8), mask, digits


def write_scenes(out: str | Path, n_train: int = 400, n_val: int = 100, size: int = 64,
                 n_digits: tuple[int, int] = (2, 3), digit_size: tuple[int, int] = (20, 32), n_clutter: int = 2,
                 seed: int = 0) -> Path:
    """Write ``out/images/{train,val}/NNNNN.png`` (RGB, grey) and ``out/masks/{train,val}/NNNNN.png`` (mode L:
    0 background, d + 1 where digit d's ink is drawn; 11 classes), and ``out/scenes.json``: for each image its
    digits (sklearn index, label, x, y, side). Digits do not overlap; train scenes draw train digits, val
    scenes val digits (``digit_split``). Idempotent; returns ``out``."""
    out = Path(out)
    if (out / ".complete").exists():
        return out
    if digit_size[1] > size:
        raise ValueError(f"digit_size {digit_size} larger than the scene size {size}")
    images, target = _load()
    split = digit_split(len(target))
    rng = np.random.default_rng(seed)
    record = {"size": size, "ink": INK, "images": {}}
    for name, n in (("train", n_train), ("val", n_val)):
        (out / "images" / name).mkdir(parents=True, exist_ok=True)
        (out / "masks" / name).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            rgb, mask, digits = _scene(rng, images, target, split[name], size, n_digits, digit_size, n_clutter)
            Image.fromarray(rgb).save(out / "images" / name / f"{k:05d}.png")
            Image.fromarray(mask, mode="L").save(out / "masks" / name / f"{k:05d}.png")
            record["images"][f"{name}/{k:05d}"] = digits
    (out / "scenes.json").write_text(json.dumps(record))
    (out / ".complete").write_text("ok\n")
    return out


def write_pretrain_scenes(out: str | Path, n: int = 1408, size: int = 64, n_digits: tuple[int, int] = (2, 3),
                          digit_size: tuple[int, int] = (20, 32), n_clutter: int = 2, seed: int = 1) -> Path:
    """Unlabelled scenes for pretraining (``make demo``): ``out/scenes/NNNNN.png``, an image folder of one class,
    drawn as ``write_scenes`` draws them but from the train digits only and another seed, so that no image of
    an evaluation split (digits val, scenes train/val, clips) is seen in pretraining; ``out/pretrain.json``
    records each image's digits. Idempotent; returns ``out``."""
    out = Path(out)
    if (out / ".complete").exists():
        return out
    images, target = _load()
    pool = digit_split(len(target))["train"]
    rng = np.random.default_rng(seed)
    (out / "scenes").mkdir(parents=True, exist_ok=True)
    record = {"size": size, "images": {}}
    for k in range(n):
        rgb, _, digits = _scene(rng, images, target, pool, size, n_digits, digit_size, n_clutter)
        Image.fromarray(rgb).save(out / "scenes" / f"{k:05d}.png")
        record["images"][f"{k:05d}"] = digits
    (out / "pretrain.json").write_text(json.dumps(record))
    (out / ".complete").write_text("ok\n")
    return out


def _bounce(p: float, v: float, hi: int) -> tuple[float, float]:
    """Position and velocity after one step of ``v`` inside [0, hi], reflected at the walls."""
    p += v
    if p < 0:
        p, v = -p, -v
    if p > hi:
        p, v = 2 * hi - p, -v
    return p, v


def write_clips(out: str | Path, n_seqs: int = 8, n_frames: int = 10, size: int = 96,
                n_objects: tuple[int, int] = (2, 3), digit_size: tuple[int, int] = (28, 40), n_clutter: int = 3,
                speed: tuple[float, float] = (2.0, 4.0), seed: int = 0) -> Path:
    """Write clips of val digits moving (bouncing, in straight lines) over a still cluttered background, in the
    DAVIS 2017 layout: ``JPEGImages/480p/<seq>/00000.jpg..``, ``Annotations/480p/<seq>/00000.png..`` (indexed
    PNG, DAVIS palette, object ids 1..N in drawing order, later ones on top; every frame annotated) and
    ``ImageSets/2017/val.txt``; ``clips.json`` records each object's digit and per-frame (x, y). Idempotent."""
    out = Path(out)
    if (out / ".complete").exists():
        return out
    if n_objects[1] >= len(DAVIS_PALETTE) // 3:
        raise ValueError(f"n_objects {n_objects}: the DAVIS palette has {len(DAVIS_PALETTE) // 3 - 1} objects")
    images, target = _load()
    val = digit_split(len(target))["val"]
    rng = np.random.default_rng(seed)
    record, names = {"size": size, "ink": INK, "seqs": {}}, []
    for q in range(n_seqs):
        seq = f"digits{q:02d}"
        names.append(seq)
        bg = clutter_background(rng, size, n_clutter, noise=0.0)
        objs = []
        for _ in range(int(rng.integers(n_objects[0], n_objects[1] + 1))):
            s = int(rng.integers(digit_size[0], digit_size[1] + 1))
            i = int(rng.choice(val))
            p = rng.uniform(0, size - s, 2)
            ang = rng.uniform(0, 2 * np.pi)
            v = rng.uniform(*speed) * np.array([np.cos(ang), np.sin(ang)])
            path = []
            for _ in range(n_frames):
                path.append([int(round(p[0])), int(round(p[1]))])
                (p[0], v[0]), (p[1], v[1]) = _bounce(p[0], v[0], size - s), _bounce(p[1], v[1], size - s)
            objs.append({"index": i, "label": int(target[i]), "side": s, "fg": float(rng.uniform(0.8, 1.0)),
                         "xy": path})
        fdir, adir = out / "JPEGImages" / "480p" / seq, out / "Annotations" / "480p" / seq
        fdir.mkdir(parents=True, exist_ok=True)
        adir.mkdir(parents=True, exist_ok=True)
        inks = [glyph(images[o["index"]], o["side"]) for o in objs]
        for t in range(n_frames):
            canvas, mask = bg.copy(), np.zeros((size, size), np.uint8)
            for oid, (o, ink) in enumerate(zip(objs, inks), start=1):
                _paste(canvas, mask, ink, *o["xy"][t], oid, o["fg"])
            rgb = (np.repeat(canvas[..., None], 3, axis=2) * 255).round().astype(np.uint8)
            Image.fromarray(rgb).save(fdir / f"{t:05d}.jpg", quality=95)
            ann = Image.fromarray(mask, mode="P")
            ann.putpalette(DAVIS_PALETTE)
            ann.save(adir / f"{t:05d}.png")
        record["seqs"][seq] = objs
    (out / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    (out / "ImageSets" / "2017" / "val.txt").write_text("".join(f"{n}\n" for n in names))
    (out / "clips.json").write_text(json.dumps(record))
    (out / ".complete").write_text("ok\n")
    return out
