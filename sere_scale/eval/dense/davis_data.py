"""Reading a DAVIS-2017 root and writing indexed PNG label maps with the DAVIS palette.

Layout (``davis_root``)::

    JPEGImages/480p/<sequence>/<frame>.jpg
    Annotations/480p/<sequence>/<frame>.png    indexed PNG: 0 background, 1..N objects, 255 void
    ImageSets/2017/<subset>.txt                one sequence name a line (train, val)

Frames and annotations of a sequence are taken in sorted file-name order, as the DAVIS toolkit and DINO do.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["DAVIS_PALETTE", "check_davis_root", "sequence_names", "frame_paths", "annotation_paths",
           "read_label_png", "write_label_png"]


def _voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (DAVIS uses it): the bits of the index, three at a time from the lowest, go to the
    high bits of red, green and blue (index 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128) ...)."""
    out = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        rgb, c = [0, 0, 0], i
        for bit in range(8):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << (7 - bit)
            c >>= 3
        out[i] = rgb
    return out


DAVIS_PALETTE = _voc_palette()  # (256, 3) uint8, embedded (DINO downloads the same table at run time)


def check_davis_root(root, subset: str | None = None, resolution: str = "480p", images: bool = True) -> Path:
    """``root`` as a Path once the pieces needed are there; otherwise FileNotFoundError listing what was looked for.
    ``subset`` also needs ImageSets/2017/<subset>.txt, ``images`` needs JPEGImages/<resolution>."""
    root = Path(root)
    wanted = [root / "Annotations" / resolution]
    if images:
        wanted.append(root / "JPEGImages" / resolution)
    if subset is not None:
        wanted.append(root / "ImageSets" / "2017" / f"{subset}.txt")
    missing = [str(p) for p in wanted if not p.exists()]
    if missing:
        raise FileNotFoundError(f"DAVIS root {root}: missing {', '.join(missing)} (looked for "
                                f"{', '.join(str(p) for p in wanted)})")
    return root


def sequence_names(root, subset: str) -> list[str]:
    """Sequence names listed in ImageSets/2017/<subset>.txt, in file order (blank lines skipped)."""
    path = Path(root) / "ImageSets" / "2017" / f"{subset}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"DAVIS sequence list not found: {path}")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"DAVIS sequence list {path} is empty")
    return names


def _sorted_files(folder: Path, suffix: str, what: str) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"DAVIS {what} folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix == suffix and p.is_file())
    if not files:
        raise FileNotFoundError(f"no {suffix} {what} in {folder}")
    return files


def frame_paths(root, sequence: str, resolution: str = "480p") -> list[Path]:
    """The sequence's JPEG frames, sorted by file name."""
    return _sorted_files(Path(root) / "JPEGImages" / resolution / sequence, ".jpg", "frames")


def annotation_paths(root, sequence: str, resolution: str = "480p") -> list[Path]:
    """The sequence's annotation PNGs, sorted by file name."""
    return _sorted_files(Path(root) / "Annotations" / resolution / sequence, ".png", "annotations")


def read_label_png(path) -> np.ndarray:
    """(H, W) uint8 label indices of an indexed (or greyscale) PNG, as ``np.array(Image.open(path))``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label PNG not found: {path}")
    with Image.open(path) as im:
        if im.mode not in ("P", "L"):
            raise ValueError(f"{path}: a label map must be an indexed (P) or greyscale (L) PNG, got mode {im.mode}")
        return np.array(im, dtype=np.uint8)


def write_label_png(path, labels) -> None:
    """Write (H, W) integer labels (0..255) as an indexed PNG with the DAVIS palette (parent folders created)."""
    arr = np.asarray(labels)
    if arr.ndim != 2:
        raise ValueError(f"{path}: a label map must be 2-D, got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(f"{path}: labels must lie in 0..255, got {arr.min()}..{arr.max()}")
    im = Image.fromarray(arr.astype(np.uint8))  # mode L; putpalette makes it P, keeping the indices
    im.putpalette(DAVIS_PALETTE.ravel().tolist())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format="PNG")
