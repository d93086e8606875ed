"""The embedded dense data (data/demo_data.py): scenes with per-pixel masks and DAVIS-layout clips. Masks are
checked against each generator's placement record and scikit-learn's own digits: labels looked up in
``load_digits``, mask support inside the recorded boxes, the mask's shape against the source 8×8 digit, rigid
motion between frames, train/val digits kept apart as in ``write_digits``; plus layout and determinism."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sere_scale.data.demo_data import DAVIS_PALETTE, write_clips, write_pretrain_scenes, write_scenes
from sere_scale.eval.dense import davis_data
from sere_scale.eval.dense.layouts import find_dataset


@pytest.fixture(scope="module")
def sk():
    from sklearn.datasets import load_digits
    d = load_digits()
    return d.images, d.target


def _shape_corr(region: np.ndarray, source8: np.ndarray) -> float:
    """Pearson correlation between a (s, s) 0/1 mask area-averaged to 8×8 and the source 8×8 digit."""
    s = region.shape[0]
    edges = np.linspace(0, s, 9).round().astype(int)
    down = np.array([[region[edges[r]:edges[r + 1], edges[c]:edges[c + 1]].mean() for c in range(8)]
                     for r in range(8)])
    return float(np.corrcoef(down.ravel(), source8.ravel())[0, 1])


def _read(p: Path) -> np.ndarray:
    return np.array(Image.open(p))


def test_scene_masks_match_placements(tmp_path, sk, digits_root):
    images, target = sk
    out = write_scenes(tmp_path / "s", n_train=12, n_val=6, size=64, n_digits=(2, 3), digit_size=(16, 28), seed=3)
    rec = json.loads((out / "scenes.json").read_text())
    assert len(rec["images"]) == 18
    val_ids = {int(f.stem) for f in (digits_root / "val").rglob("*.png")}
    n_digits = 0
    for key, digits in rec["images"].items():
        split, name = key.split("/")
        img, mask = _read(out / "images" / split / f"{name}.png"), _read(out / "masks" / split / f"{name}.png")
        assert img.shape == (64, 64, 3) and mask.shape == (64, 64) and mask.dtype == np.uint8
        outside = np.ones_like(mask, bool)
        for d in digits:
            n_digits += 1
            assert d["label"] == target[d["index"]] + 1  # 1..10 = digit + 1, looked up independently
            assert (d["index"] in val_ids) == (split == "val")  # the CLS data's split, no leak
            x, y, s = d["x"], d["y"], d["side"]
            assert 0 <= x and x + s <= 64 and 0 <= y and y + s <= 64
            box = mask[y:y + s, x:x + s]
            assert set(np.unique(box)) <= {0, d["label"]}
            assert outside[y:y + s, x:x + s].all(), "digits overlap"
            outside[y:y + s, x:x + s] = False
            assert _shape_corr(box == d["label"], images[d["index"]]) > 0.8
            ink = img[y:y + s, x:x + s, 0][box == d["label"]]
            assert ink.mean() > img[..., 0][mask == 0].mean()  # the labelled pixels are the bright ink
        assert (mask[outside] == 0).all()
    assert n_digits >= 18 * 2 * 0.8  # most scenes got their digits placed
    for split, n in (("train", 12), ("val", 6)):  # the generic layout as the segmentation probes read it
        ds = find_dataset(out, split, num_classes=11, ignore_index=255)
        assert len(ds) == n
        img, m = ds.load(0)
        assert img.size == (64, 64) and m.max() <= 10


def test_pretraining_scenes_use_train_digits_only_and_are_an_image_folder(tmp_path, sk, digits_root):
    """``make demo`` pretrains on these: never a val digit (the k-NN/linear val split, the val scenes, the clips),
    never an image of the probes' scenes, and a folder the training loader reads (one class)."""
    from sere_scale.data.folder import scan_folder
    images, target = sk
    out = write_pretrain_scenes(tmp_path / "p", n=20, seed=1)
    rec = json.loads((out / "pretrain.json").read_text())["images"]
    val_ids = {int(f.stem) for f in (digits_root / "val").rglob("*.png")}
    assert len(rec) == 20 and sum(len(d) for d in rec.values()) >= 20 * 2 * 0.8
    for name, digits in rec.items():
        img = _read(out / "scenes" / f"{name}.png")
        assert img.shape == (64, 64, 3)
        for d in digits:
            assert d["index"] not in val_ids and d["label"] == target[d["index"]] + 1
            x, y, s = d["x"], d["y"], d["side"]
            patch = img[y:y + s, x:x + s, 0].astype(float)
            assert patch.max() > 150  # the digit's ink is drawn where recorded
    items, classes = scan_folder(out)
    assert classes == ["scenes"] and len(items) == 20
    probe = write_scenes(tmp_path / "s", n_train=20, n_val=5)
    probe_imgs = {(probe / "images" / sp / f).read_bytes() for sp in ("train", "val")
                  for f in sorted(p.name for p in (probe / "images" / sp).iterdir())}
    assert not probe_imgs & {f.read_bytes() for f in (out / "scenes").iterdir()}


def test_clips_davis_layout_and_rigid_motion(tmp_path, sk):
    images, target = sk
    out = write_clips(tmp_path / "c", n_seqs=3, n_frames=6, size=64, n_objects=(2, 3), digit_size=(16, 22),
                      seed=5)
    davis_data.check_davis_root(out, "val")  # the layout as the DAVIS evaluation reads it
    seqs = davis_data.sequence_names(out, "val")
    rec = json.loads((out / "clips.json").read_text())["seqs"]
    assert len(seqs) == 3 and sorted(seqs) == sorted(rec)
    for seq in seqs:
        frames, anns = davis_data.frame_paths(out, seq), davis_data.annotation_paths(out, seq)
        assert [f.stem for f in frames] == [a.stem for a in anns] == [f"{t:05d}" for t in range(6)]
        objs = rec[seq]
        masks = []
        for f, a in zip(frames, anns):
            assert Image.open(a).mode == "P" and Image.open(f).size == (64, 64)
            masks.append(davis_data.read_label_png(a))
        for oid, o in enumerate(objs, start=1):
            assert 0 <= target[o["index"]] == o["label"]
            s = o["side"]
            for t, m in enumerate(masks):
                x, y = o["xy"][t]
                inside = np.zeros_like(m, bool)
                inside[y:y + s, x:x + s] = True
                assert not (m == oid)[~inside].any()  # an object's pixels lie in its recorded box
                others = [q for q in objs if q is not o]
                if not any(_overlap(o, q, t) for q in others):
                    assert _shape_corr(m[y:y + s, x:x + s] == oid, images[o["index"]]) > 0.8
                    if t and not any(_overlap(o, q, t - 1) for q in others):  # rigid translation of the glyph
                        px, py = o["xy"][t - 1]
                        np.testing.assert_array_equal(m[y:y + s, x:x + s] == oid,
                                                      masks[t - 1][py:py + s, px:px + s] == oid)
        assert set(np.unique(np.stack(masks))) <= set(range(len(objs) + 1))
        assert {int(v) for v in np.unique(masks[0])} - {0}, "first frame annotates some object"


def test_palette_is_davis():
    """The clips' annotation colours are DAVIS's (the evaluation's VOC colour map), object ids 0..7."""
    assert DAVIS_PALETTE == davis_data.DAVIS_PALETTE[:8].ravel().tolist()


def _overlap(a, b, t) -> bool:
    (ax, ay), (bx, by) = a["xy"][t], b["xy"][t]
    return not (ax + a["side"] <= bx or bx + b["side"] <= ax or ay + a["side"] <= by or by + b["side"] <= ay)


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_from_seed(tmp_path):
    kw = {"n_train": 4, "n_val": 2, "size": 48, "digit_size": (16, 24)}
    a, b, c = (write_scenes(tmp_path / n, seed=s, **kw) for n, s in (("a", 1), ("b", 1), ("c", 2)))
    assert _tree(a) == _tree(b)
    assert (a / "scenes.json").read_bytes() != (c / "scenes.json").read_bytes()
    ca, cb = (write_clips(tmp_path / n, n_seqs=2, n_frames=3, size=48, digit_size=(12, 16), seed=1)
              for n in ("ca", "cb"))
    assert _tree(ca) == _tree(cb)


def test_bad_sizes_named(tmp_path):
    with pytest.raises(ValueError, match="digit_size"):
        write_scenes(tmp_path / "x", size=32, digit_size=(24, 40))
    with pytest.raises(ValueError, match="n_objects"):
        write_clips(tmp_path / "y", n_objects=(1, 9))
