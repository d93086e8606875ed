"""Tiny ImageNet-like trees for the data-plane tests (converter and shard loader)."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def noisy_rgb(seed: int, w: int = 64, h: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * (3 + c) + y * (2 + c) + 40 * c) % 256 for c in range(3)], -1)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def jpeg_bytes(arr: np.ndarray, **kw) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, "JPEG", quality=90, **kw)
    return b.getvalue()


def make_tree(root: Path, classes=("n001", "n002", "n003"), per_class: int = 5, specials: bool = True,
              seed: int = 0) -> dict:
    """SRC/train/<wnid>/*.JPEG; returns {"good": {rel: wnid}, "bad": set(rel), "kinds": {rel: kind}}."""
    good, bad, kinds = {}, set(), {}
    k = seed * 1000
    for c in classes:
        d = root / "train" / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            k += 1
            p = d / f"{c}_{i}.JPEG"
            p.write_bytes(jpeg_bytes(noisy_rgb(k)))
            rel = str(p.relative_to(root))
            good[rel], kinds[rel] = c, "rgb"
    if specials:
        c0, c1, c2 = classes[0], classes[1 % len(classes)], classes[2 % len(classes)]
        t = root / "train"

        def put(rel, data, kind, ok=True, wnid=None):
            p = t / rel
            p.write_bytes(data)
            r = str(p.relative_to(root))
            kinds[r] = kind
            if ok:
                good[r] = wnid or rel.split("/")[0]
            else:
                bad.add(r)

        put(f"{c0}/zero.JPEG", b"", "zero", ok=False)
        full = jpeg_bytes(noisy_rgb(900))
        put(f"{c1}/truncated.JPEG", full[: len(full) * 2 // 3], "truncated", ok=False)
        put(f"{c2}/notes.txt", b"not an image\n", "text", ok=False)
        put(f"{c0}/gray.JPEG", jpeg_bytes(noisy_rgb(901)[..., 0]), "gray")
        b = io.BytesIO()
        Image.fromarray(noisy_rgb(902)).convert("CMYK").save(b, "JPEG", quality=95)
        put(f"{c1}/cmyk.JPEG", b.getvalue(), "cmyk")
        rgba = np.concatenate([noisy_rgb(903), np.full((48, 64, 1), 128, np.uint8)], -1)
        b = io.BytesIO()
        Image.fromarray(rgba, "RGBA").save(b, "PNG")
        put(f"{c2}/alpha_png.JPEG", b.getvalue(), "png_alpha")
        put(f"{c2}/progressive.JPEG", jpeg_bytes(noisy_rgb(904), progressive=True), "progressive")
    return {"good": good, "bad": bad, "kinds": kinds}


def run_prep(*args, env=None, check=True, **kw) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    e.update(env or {})
    r = subprocess.run([PY, "-m", "data_prep", *map(str, args)], env=e, capture_output=True, text=True, check=False,
                       **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"sere-prep {args} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def read_tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    """Independent reader: key → {ext: bytes} with the standard library only."""
    import tarfile
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for ti in tf:
            base = ti.name.rsplit("/", 1)[-1]
            key, ext = base.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(ti).read()
    return out
