"""ImageNet-style folder dataset (class sub-folders) with corrupt-image skipping and deterministic crops."""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Callable, Optional

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from sere_scale.data.corrupt import Corrupt, NoReadableSample
from sere_scale.data.pixels import decode_rgb
from sere_scale.data.transform import sample_rng

log = logging.getLogger(__name__)
IMG_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff", ".gif"}


def scan_folder(root: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str]]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder '{root}' does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"data folder '{root}' has no class sub-folders (expected ROOT/<class>/<image>)")
    items = []
    for ci, c in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(root / c)):
            for f in sorted(files):
                if Path(f).suffix.lower() in IMG_EXT:
                    items.append((os.path.join(dirpath, f), ci))
    if not items:
        raise ValueError(f"data folder '{root}' holds no images")
    return items, classes


def load_rgb(path: str) -> Optional[Image.Image]:
    """Decode an image fully; ``None`` (with a warning) if it is unreadable, truncated or corrupt."""
    try:
        return decode_rgb(path)  # bounded decode, high bit depths scaled (data/pixels.py)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        log.warning("skipping unreadable image %s: %s", path, e)
        return None


class ImageFolderSSL(Dataset):
    """Items are ``transform(image)`` dicts plus ``label``/``index``, or a ``corrupt.Corrupt`` marker for a corrupt
    file (the collate fills its slot: ``corrupt.fill_corrupt``).

    ``set_epoch`` changes the augmentation seed; each item's randomness depends only on (seed, epoch, index).
    """

    def __init__(self, root: str, transform: Callable, seed: int = 0):
        self.items, self.classes = scan_folder(root)
        self.transform, self.seed, self.epoch = transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, label = self.items[index]
        img = load_rgb(path)
        if img is None:
            return self.corrupt(index)
        with sample_rng(self.seed, self.epoch, index):
            out = self.transform(img)
        out["label"], out["index"] = label, index
        return out

    def corrupt(self, index: int) -> Corrupt:
        return Corrupt(index, functools.partial(self.readable_after, index))

    def readable_after(self, index: int):
        """The next readable item after ``index`` in file order (wrapping): an all-corrupt batch's fallback."""
        n = len(self)
        for k in range(1, n):
            item = self[(index + k) % n]
            if not isinstance(item, Corrupt):
                return item
        raise NoReadableSample(f"no image of the {n} under the data folder can be read")
