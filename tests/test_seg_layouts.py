"""Segmentation folder layouts (eval/dense/layouts.py): each data set's convention on tiny folders, and errors."""
import numpy as np
import pytest
from PIL import Image

from sere_scale.eval.dense.layouts import find_dataset


def image(path, w=6, h=4):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(path)


def mask(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr)
    if mode == "P":
        im = im.convert("P")  # a palette mask, as VOC's SegmentationClass
        im.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    im.save(path)


VOC_LABELS = np.array([[0, 0, 15, 15, 255, 20]] * 4, np.uint8)


def voc(root, aug=False):
    base = root / "VOCdevkit" / "VOC2012"
    sets = base / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("a\n")
    (sets / "val.txt").write_text("b\n")
    for i in "ab":
        image(base / "JPEGImages" / f"{i}.jpg")
        mask(base / "SegmentationClass" / f"{i}.png", VOC_LABELS, "P")
    if aug:
        (sets / "trainaug.txt").write_text("a\nc\n")
        image(base / "JPEGImages" / "c.jpg")
        for i in "ac":
            mask(base / "SegmentationClassAug" / f"{i}.png", np.full((4, 6), 7, np.uint8))
    return base


def test_voc_palette_masks_keep_indices_and_255(tmp_path):
    base = voc(tmp_path)
    assert Image.open(base / "SegmentationClass" / "a.png").mode == "P"
    for root in (tmp_path / "VOCdevkit", base):
        ds = find_dataset(root, "train")
        assert (ds.name, ds.split, ds.num_classes, ds.ignore_index, len(ds)) == ("voc", "train", 21, 255, 1)
        img, m = ds.load(0)
        assert img.size == (6, 4) and m.dtype == np.int64
        np.testing.assert_array_equal(m, VOC_LABELS)
    assert find_dataset(base, "val").items[0][0].name == "b.jpg"


def test_voc_trainaug(tmp_path):
    voc(tmp_path, aug=True)
    ds = find_dataset(tmp_path / "VOCdevkit", "train")
    assert ds.split == "trainaug" and [p[1].parent.name for p in ds.items] == ["SegmentationClassAug"] * 2
    assert (ds.mask(1) == 7).all()
    assert find_dataset(tmp_path / "VOCdevkit", "val").items[0][1].parent.name == "SegmentationClass"


def test_ade20k_zero_ignored_and_shifted(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    image(base / "images" / "training" / "x.jpg", 3, 1)
    mask(base / "annotations" / "training" / "x.png", np.array([[0, 1, 150]], np.uint8))
    for root in (tmp_path, base):
        ds = find_dataset(root, "train")
        assert (ds.name, ds.split, ds.num_classes) == ("ade20k", "training", 150)
        np.testing.assert_array_equal(ds.load(0)[1], [[255, 0, 149]])
    mask(base / "annotations" / "training" / "x.png", np.array([[0, 1, 151]], np.uint8))
    with pytest.raises(ValueError, match=r"x\.png.*label 150"):
        find_dataset(tmp_path, "train").load(0)


def test_cityscapes_train_ids(tmp_path):
    stem = "aachen_000000_000019"
    image(tmp_path / "leftImg8bit" / "val" / "aachen" / f"{stem}_leftImg8bit.png", 4, 2)
    gt = tmp_path / "gtFine" / "val" / "aachen" / f"{stem}_gtFine_labelTrainIds.png"
    mask(gt, np.array([[0, 18, 255, 5], [1, 2, 3, 4]], np.uint8))
    ds = find_dataset(tmp_path, "val")
    assert (ds.name, ds.num_classes, ds.ignore_index) == ("cityscapes", 19, 255)
    np.testing.assert_array_equal(ds.load(0)[1], [[0, 18, 255, 5], [1, 2, 3, 4]])
    mask(gt, np.array([[0, 19, 255, 5], [1, 2, 3, 4]], np.uint8))
    with pytest.raises(ValueError, match="labelTrainIds.png.*label 19"):
        ds.load(0)
    gt.unlink()
    with pytest.raises(FileNotFoundError, match="createTrainIdLabelImgs"):
        find_dataset(tmp_path, "val")


def test_generic_16_bit_masks(tmp_path):
    image(tmp_path / "images" / "train" / "a.png", 3, 1)
    mask(tmp_path / "masks" / "train" / "a.png", np.array([[300, 0, 999]], np.uint16))
    assert Image.open(tmp_path / "masks" / "train" / "a.png").mode.startswith("I")
    ds = find_dataset(tmp_path, "train", num_classes=301, ignore_index=999)
    assert ds.name == "generic"
    np.testing.assert_array_equal(ds.load(0)[1], [[300, 0, 999]])
    with pytest.raises(ValueError, match="--num-classes"):
        find_dataset(tmp_path, "train")
    with pytest.raises(ValueError, match=r"a\.png.*label 300"):
        find_dataset(tmp_path, "train", num_classes=300, ignore_index=999).load(0)


def test_errors_name_the_file(tmp_path):
    image(tmp_path / "images" / "train" / "a.png", 3, 2)
    (tmp_path / "masks" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"images/train/a\.png.*masks/train/a\.png"):
        find_dataset(tmp_path, "train", 3, 255)
    mask(tmp_path / "masks" / "train" / "a.png", np.zeros((2, 4), np.uint8))
    with pytest.raises(ValueError, match=r"a\.png' is 3x2 but its mask .*a\.png' is 4x2"):
        find_dataset(tmp_path, "train", 3, 255).load(0)
    (tmp_path / "images" / "val").mkdir()
    with pytest.raises(ValueError, match="split 'val' .* no images"):
        find_dataset(tmp_path, "val", 3, 255)
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(tmp_path / "masks" / "train" / "a.png")
    with pytest.raises(ValueError, match="colour"):
        find_dataset(tmp_path, "train", 3, 255).load(0)


def test_unknown_folder_and_conflicts(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(ValueError, match="Pascal VOC.*ADE20K.*Cityscapes.*generic"):
        find_dataset(tmp_path, "train")
    voc(tmp_path)
    with pytest.raises(ValueError, match="classes is 21"):
        find_dataset(tmp_path / "VOCdevkit", "train", num_classes=19)
    with pytest.raises(FileNotFoundError, match="listed in"):
        (tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages" / "a.jpg").unlink()
        find_dataset(tmp_path / "VOCdevkit", "train")
