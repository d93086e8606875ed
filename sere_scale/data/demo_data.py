"""The embedded real data set: scikit-learn's handwritten digits (1,797 labelled 8×8 images, shipped inside the
scikit-learn package), upscaled and written as an ImageNet-style folder (train/ and val/, one sub-folder per
class)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(out: str | Path, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write ``out/train/<digit>/*.png`` and ``out/val/<digit>/*.png``; returns ``out``. Idempotent."""
    from sklearn.datasets import load_digits

    out = Path(out)
    done = out / ".complete"
    if done.exists():
        return out
    d = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(d.target))
    n_val = int(len(order) * val_fraction)
    for split, idx in (("val", order[:n_val]), ("train", order[n_val:])):
        for i in idx:
            img = (d.images[i] / 16.0 * 255).astype(np.uint8)
            pil = Image.fromarray(img, mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
            folder = out / split / f"digit_{d.target[i]}"
            folder.mkdir(parents=True, exist_ok=True)
            pil.save(folder / f"{i:05d}.png")
    done.write_text("ok\n")
    return out
