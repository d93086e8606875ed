"""Segmentation data sets, recognised from a folder's content (no flag).

* **Pascal VOC 2012** — a ``VOC2012`` folder or its ``VOCdevkit`` parent: ``JPEGImages/<id>.jpg``, masks in
  ``SegmentationClass/`` (palette PNGs) or ``SegmentationClassAug/``, lists ``ImageSets/Segmentation/<split>.txt``.
  Train: ``trainaug.txt`` with ``SegmentationClassAug`` when both exist, else ``train.txt`` with
  ``SegmentationClass``; val: ``val.txt`` with ``SegmentationClass`` (``SegmentationClassAug`` if that is all
  there is). 21 classes, 255 ignored (object boundaries).
* **ADE20K** (SceneParsing) — ``ADEChallengeData2016`` or its parent: ``images/{training,validation}/*.jpg`` and
  ``annotations/.../<stem>.png``. 150 classes: raw label 0 ("other") is ignored (255), the others shift down by
  one (mmsegmentation's ``reduce_zero_label``).
* **Cityscapes** — ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` with
  ``gtFine/<split>/<city>/*_gtFine_labelTrainIds.png`` (cityscapesScripts' ``createTrainIdLabelImgs``).
  19 classes, 255 ignored.
* **Generic** — ``images/<split>/<stem>.<ext>`` and ``masks/<split>/<stem>.png``; the number of classes and the
  ignore index must be given.

Masks are read as integer labels whatever their bit depth (palette / 8-bit / 16-bit grey; never through an RGB
conversion); a colour (RGB) mask is an error. Errors name the file: a missing mask, an image and mask of
different sizes, an empty split, a label ≥ num_classes that is not the ignore index.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
LOOKED_FOR = ("Pascal VOC 2012: VOC2012/ (or VOCdevkit/VOC2012/) with JPEGImages/ and ImageSets/Segmentation/",
              "ADE20K: ADEChallengeData2016/ (or that folder) with images/{training,validation}/ and annotations/",
              "Cityscapes: leftImg8bit/ and gtFine/",
              "generic: images/<split>/ and masks/<split>/ (with num_classes and ignore_index)")
KNOWN = {"voc": (21, 255), "ade20k": (150, 255), "cityscapes": (19, 255)}


def same_labels(m: np.ndarray) -> np.ndarray:
    return m.astype(np.int64)


def ade20k_labels(m: np.ndarray) -> np.ndarray:
    """ADE20K's raw labels: 0 → 255 (ignored), k → k − 1."""
    m = m.astype(np.int64)
    return np.where(m == 0, 255, m - 1)


def read_mask(path: Path) -> np.ndarray:
    """The integer labels of a single-channel PNG (palette indices, 8- or 16-bit grey) as an int array."""
    with Image.open(path) as im:
        if im.mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr"):
            raise ValueError(f"mask '{path}' is a colour ({im.mode}) image: label masks must be single-channel "
                             f"(palette, 8- or 16-bit grey) class indices")
        return np.array(im)


@dataclass
class SegDataset:
    """(image, mask) path pairs of one split, with the label convention of their data set."""

    name: str
    split: str
    root: Path
    items: list[tuple[Path, Path]]
    num_classes: int
    ignore_index: int
    map_labels: Callable[[np.ndarray], np.ndarray] = same_labels  # raw mask → labels (module-level: picklable)

    def __len__(self) -> int:
        return len(self.items)

    def mask(self, i: int) -> np.ndarray:
        """int64 labels of item ``i`` after the data set's mapping, checked against ``num_classes``."""
        path = self.items[i][1]
        m = self.map_labels(read_mask(path))
        bad = (m != self.ignore_index) & ((m < 0) | (m >= self.num_classes))
        if bad.any():
            raise ValueError(f"mask '{path}': label {int(m[bad][0])} is outside [0, {self.num_classes}) and not the "
                             f"ignore index {self.ignore_index} ({self.name} labels)")
        return m

    def load(self, i: int) -> tuple[Image.Image, np.ndarray]:
        """(RGB image, int64 labels) of item ``i``; an image and mask of different sizes is an error."""
        img_path, mask_path = self.items[i]
        with Image.open(img_path) as im:
            img = im.convert("RGB")
        m = self.mask(i)
        if m.shape != (img.height, img.width):
            raise ValueError(f"image '{img_path}' is {img.width}x{img.height} but its mask '{mask_path}' is "
                             f"{m.shape[1]}x{m.shape[0]}")
        return img, m


def _pairs(images: list[Path], mask_of: Callable[[Path], Path], hint: str = "") -> list[tuple[Path, Path]]:
    out = []
    for img in images:
        m = mask_of(img)
        if not m.is_file():
            raise FileNotFoundError(f"no mask for image '{img}': expected '{m}'{hint}")
        out.append((img, m))
    return out


def _voc(c: Path, split: str) -> tuple[str, list[tuple[Path, Path]]]:
    sets = c / "ImageSets" / "Segmentation"
    cls, aug = c / "SegmentationClass", c / "SegmentationClassAug"
    if split == "train" and aug.is_dir() and (sets / "trainaug.txt").is_file():
        name, masks = "trainaug", aug
    else:
        name, masks = split, cls if cls.is_dir() else aug
    listing = sets / f"{name}.txt"
    if not listing.is_file():
        raise FileNotFoundError(f"Pascal VOC split list '{listing}' does not exist")
    ids = [s.strip() for s in listing.read_text().splitlines() if s.strip()]
    images = []
    for i in ids:
        img = c / "JPEGImages" / f"{i}.jpg"
        if not img.is_file():
            raise FileNotFoundError(f"image '{img}' listed in '{listing}' does not exist")
        images.append(img)
    return name, _pairs(images, lambda p: masks / f"{p.stem}.png")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS) if folder.is_dir() else []


def find_dataset(root, split: str, num_classes: Optional[int] = None,
                 ignore_index: Optional[int] = None) -> SegDataset:
    """The ``split`` ("train" or "val") of the segmentation data set at ``root`` (layouts: module docstring).
    ``num_classes`` / ``ignore_index`` are required for a generic folder and must agree with a known layout."""
    root = Path(root)
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got '{split}'")
    if not root.is_dir():
        raise FileNotFoundError(f"segmentation data folder '{root}' does not exist")
    voc = [c for c in (root, root / "VOC2012") if (c / "JPEGImages").is_dir() and
           (c / "ImageSets" / "Segmentation").is_dir()]
    ade = [c for c in (root, root / "ADEChallengeData2016") if (c / "images").is_dir() and
           (c / "annotations").is_dir() and any((c / "images" / s).is_dir() for s in ("training", "validation"))]
    mapping = same_labels
    if voc:
        kind, c = "voc", voc[0]
        split_name, items = _voc(c, split)
    elif ade:
        kind, c, mapping = "ade20k", ade[0], ade20k_labels
        split_name = {"train": "training", "val": "validation"}[split]
        ann = c / "annotations" / split_name
        items = _pairs(_images_in(c / "images" / split_name), lambda p: ann / f"{p.stem}.png")
    elif (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir():
        kind, c, split_name = "cityscapes", root, split
        suffix = "_leftImg8bit.png"
        images = sorted((root / "leftImg8bit" / split).glob(f"*/*{suffix}"))
        items = _pairs(images, lambda p: root / "gtFine" / split / p.parent.name /
                       (p.name[:-len(suffix)] + "_gtFine_labelTrainIds.png"),
                       " (make the train-id masks with cityscapesScripts' createTrainIdLabelImgs)")
    elif (root / "images").is_dir() and (root / "masks").is_dir():
        kind, c, split_name = "generic", root, split
        if num_classes is None or ignore_index is None:
            raise ValueError(f"'{root}' is a generic images/ + masks/ folder: give the number of classes and the "
                             f"ignore index (--num-classes, --ignore-index)")
        items = _pairs(_images_in(root / "images" / split), lambda p: root / "masks" / split / f"{p.stem}.png")
    else:
        raise ValueError(f"'{root}' is no known segmentation layout; looked for: " + "; ".join(LOOKED_FOR))
    if kind in KNOWN:
        known = KNOWN[kind]
        for what, given, default in (("classes", num_classes, known[0]), ("ignore index", ignore_index, known[1])):
            if given is not None and int(given) != default:
                raise ValueError(f"'{root}' is {kind}, whose {what} is {default}; {given} was given")
        num_classes, ignore_index = known
    if not items:
        raise ValueError(f"split '{split_name}' of {kind} data set '{c}' has no images")
    return SegDataset(kind, split_name, c, items, int(num_classes), int(ignore_index), mapping)
