"""List the images of one split of an ImageNet-style tree, with their class (wnid).

* ``SRC/train/<wnid>/**`` (and ``SRC/val/<wnid>/**`` when val is in class folders);
* a flat ``SRC/val/`` with a label file: ``--labels FILE`` or, found automatically in SRC or SRC/val, one of
  ``LOC_val_solution.csv`` (Kaggle: ``ImageId,PredictionString`` whose first word is the wnid),
  ``val_labels.txt`` / ``val_labels.csv`` (``name wnid`` or ``name,wnid`` per line; names with or without
  extension).

Classes are the sorted wnids of ``SRC/train`` when it exists (so val labels agree with train labels), otherwise
of the split itself. Every regular, non-hidden file counts as an input; one that is not an image is reported
as corrupt by the converter, never silently dropped.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

LABEL_FILES = ("LOC_val_solution.csv", "val_labels.txt", "val_labels.csv")


class SourceError(ValueError):
    pass


def _files_under(d: Path) -> list[str]:
    out = []
    for dirpath, dirnames, files in os.walk(d):
        dirnames[:] = sorted(x for x in dirnames if not x.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in files if not f.startswith("."))
    return out


def class_dirs(d: Path) -> list[str]:
    return sorted(x.name for x in d.iterdir() if x.is_dir() and not x.name.startswith("."))


def read_label_file(path: Path) -> dict[str, str]:
    """Map image stem → wnid from a label file (formats in the module docstring)."""
    labels: dict[str, str] = {}
    with open(path, newline="") as f:
        text = f.read()
    rows = csv.reader(text.splitlines()) if "," in text.split("\n", 1)[0] else (ln.split() for ln in text.splitlines())
    for n, row in enumerate(rows):
        row = [c.strip() for c in row if c.strip()]
        if not row or row[0].startswith("#"):
            continue
        if n == 0 and row[0].lower() in ("imageid", "image", "filename", "file", "name"):
            continue  # header
        if len(row) < 2:
            raise SourceError(f"{path}:{n + 1}: expected 'name wnid', got {row!r}")
        labels[Path(row[0]).stem] = row[1].split()[0]
    if not labels:
        raise SourceError(f"label file {path} holds no labels")
    return labels


def list_split(src: str | os.PathLike, split: str, labels: str | None = None
               ) -> tuple[list[tuple[str, str]], list[str]]:
    """``([(relative path, wnid)] sorted by path, classes)`` for ``split`` of the tree ``src``."""
    src = Path(src)
    d = src / split
    if not d.is_dir():
        raise SourceError(f"'{d}' does not exist: expected an ImageNet-style tree with '{split}/' in {src}")
    train_classes = class_dirs(src / "train") if (src / "train").is_dir() else None
    sub = class_dirs(d)
    items: list[tuple[str, str]] = []
    if sub:
        for wnid in sub:
            items.extend((os.path.relpath(p, src), wnid) for p in _files_under(d / wnid))
        stray = [f for f in os.listdir(d) if (d / f).is_file() and not f.startswith(".")]
        if stray:
            raise SourceError(f"'{d}' mixes class folders with {len(stray)} loose files (e.g. {stray[0]})")
    else:
        label_path = Path(labels) if labels else next(
            (p for name in LABEL_FILES for p in (src / name, d / name) if p.is_file()), None)
        if label_path is None:
            raise SourceError(f"'{d}' is flat (no class folders): pass --labels FILE "
                              f"(or put one of {', '.join(LABEL_FILES)} in {src})")
        table = read_label_file(label_path)
        missing = []
        for p in _files_under(d):
            stem = Path(p).stem
            if Path(p).name in LABEL_FILES:
                continue
            if stem not in table:
                missing.append(p)
                continue
            items.append((os.path.relpath(p, src), table[stem]))
        if missing:
            raise SourceError(f"{len(missing)} images in '{d}' have no label in {label_path} "
                              f"(e.g. {os.path.basename(missing[0])})")
    if not items:
        raise SourceError(f"'{d}' holds no files")
    classes = train_classes or sorted({w for _, w in items})
    known = set(classes)
    unknown = sorted({w for _, w in items if w not in known})
    if unknown:
        raise SourceError(f"{split} has {len(unknown)} classes not among the {len(classes)} train classes "
                          f"(e.g. {unknown[0]})")
    items.sort()
    return items, classes
