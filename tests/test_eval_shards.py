"""Evaluation from WebDataset shards (sere_scale/data/evaldata.py): the same features, labels and k-NN accuracy as
the same images read as an image folder; the folder/shard rule; corrupt samples; periodic k-NN in training.

The images are a subset of the embedded digits saved as baseline JPEGs: sere-prep keeps such files byte for byte
(PNGs would be re-encoded, changing the pixels), so the folder and the shards hold the very same bytes."""
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.convert import ConvertOptions, convert
from data_prep.tarwrite import ShardTarWriter
from sere_scale.data.evaldata import ShardImages, is_shard_spec, iter_rgb, source_id
from sere_scale.data.folder import load_rgb, scan_folder
from sere_scale.eval.features import extract_features
from sere_scale.eval.knn import knn_accuracy
from tests.data_plane_fixtures import read_tar_samples

PER_CLASS = {"train": 24, "val": 8}  # 240 / 80 images


@pytest.fixture(scope="module")
def trees(tmp_path_factory, digits_root):
    """``src``: SRC/{train,val}/digit_k/*.jpg (a digits subset as JPEG); ``out``: its shards (both splits)."""
    base = tmp_path_factory.mktemp("evalshards")
    src, out = base / "src", base / "out"
    for split, n in PER_CLASS.items():
        for cdir in sorted((digits_root / split).iterdir()):
            if not cdir.is_dir():
                continue
            (src / split / cdir.name).mkdir(parents=True)
            for p in sorted(cdir.glob("*.png"))[:n]:
                Image.open(p).convert("RGB").save(src / split / cdir.name / f"{p.stem}.jpg", quality=90)
    for split, size in (("train", 64), ("val", 24)):
        convert(ConvertOptions(str(src), str(out), split, shard_size=size, workers=1, fsync=False, progress=False))
    return src, out


def tiny_backbone():
    from sere_scale.config.load import load_config
    from sere_scale.models.backbone import ViTBackbone, create_vit
    from tests.tiny import TINY
    torch.manual_seed(0)
    return ViTBackbone(create_vit(load_config(None, TINY).model, 32, 0.0)).eval()


def rows(f, y):
    """(features, label) rows sorted lexicographically: an order-free comparison of two feature sets."""
    a = np.concatenate([f.numpy().astype(np.float64), y.numpy()[:, None].astype(np.float64)], 1)
    return a[np.lexsort(a.T[::-1])]


def test_the_folder_or_shards_rule(trees, tmp_path):
    src, out = trees
    info = json.loads((out / "_info.json").read_text())
    first = out / info["splits"]["val"]["filenames"][0]
    (tmp_path / "list.txt").write_text(f"{first}\n")
    assert not is_shard_spec(src / "val") and not is_shard_spec(next((src / "val" / "digit_0").iterdir()))
    for spec in (out, f"{out}#val", out / "_info.json", f"{out}/_info.json#val", first, tmp_path / "list.txt",
                 f"{out}/imagenet-val-{{000000..000003}}.tar"):
        assert is_shard_spec(spec), spec
    with pytest.raises(FileNotFoundError, match="neither|image folder"):
        extract_features(tiny_backbone(), tmp_path / "no_such_dir", 32)
    # the split defaults to the role's (train / val) and the cache keys of the two differ
    assert source_id(out, "train") != source_id(out, "val") == source_id(f"{out}#val", "train")


def test_shard_labels_are_the_folder_class_indices(trees):
    """sere-prep's class index = position of the class among the sorted class folders of train, which is what
    scan_folder and torchvision's ImageFolder use."""
    from torchvision.datasets import ImageFolder
    src, out = trees
    info = json.loads((out / "_info.json").read_text())
    _, classes = scan_folder(src / "train")
    assert info["classes"] == classes == ImageFolder(str(src / "train")).classes
    n = 0
    for name in info["splits"]["val"]["filenames"]:
        for sample in read_tar_samples(out / name).values():
            meta = json.loads(sample["json"])
            assert int(sample["cls"]) == classes.index(Path(meta["path"]).parent.name) == meta["label"]
            n += 1
    assert n == 80


def test_features_and_knn_from_shards_equal_the_folder(trees, tmp_path):
    src, out = trees
    bb = tiny_backbone()
    folder = {s: extract_features(bb, src / s, 32, batch_size=1) for s in ("train", "val")}
    st = {}
    shards = {"train": extract_features(bb, out, 32, batch_size=1, split="train"),
              "val": extract_features(bb, f"{out}#val", 32, batch_size=1, stats=st)}
    assert st == {"n": 80, "n_corrupt": 0}
    for s in ("train", "val"):
        (ff, fy, fc), (sf, sy, sc) = folder[s], shards[s]
        assert fc == sc and len(fy) == len(sy) == 10 * PER_CLASS[s]
        assert np.array_equal(rows(ff, fy), rows(sf, sy))  # the same (feature, label) pairs, bit for bit
    # other spellings of the same shards, and loader workers: the same features in the same (listed) order
    info = json.loads((out / "_info.json").read_text())["splits"]["val"]
    (tmp_path / "val.txt").write_text("".join(f"{out / n} {c}\n" for n, c in zip(info["filenames"],
                                                                                  info["shard_lengths"])))
    for spec, kw in ((tmp_path / "val.txt", {}), (f"{out}/imagenet-val-{{000000..000003}}.tar", {}),
                     (out / "_info.json", {"split": "val", "num_workers": 2})):
        f, y, c = extract_features(bb, spec, 32, **{"batch_size": 1, **kw})
        assert torch.equal(f, shards["val"][0]) and torch.equal(y, shards["val"][1]), spec
    # k-NN: identical accuracy from folders, shards and a mix (the order of the bank does not matter)
    ref = knn_accuracy(bb, src / "train", src / "val", 32, k=10, batch_size=1)
    assert knn_accuracy(bb, out, out, 32, k=10, batch_size=1) == ref
    assert knn_accuracy(bb, src / "train", f"{out}#val", 32, k=10, batch_size=1) == ref
    assert ref["n_train"] == 240 and ref["n_val"] == 80 and ref["n_corrupt_val"] == 0
    # the linear probe reads the same shards; train and val features are cached apart
    from sere_scale.eval.linear import linear_accuracy
    res = linear_accuracy(bb, out, out, 32, tmp_path / "cache", {"b": "tiny"}, lrs=(1.0,), epochs=3)
    assert res["n_train"] == 240 and res["n_val"] == 80 and len(list((tmp_path / "cache").glob("*.pt"))) == 2


def test_corrupt_samples_are_skipped_and_counted(trees, tmp_path, caplog):
    src, out = trees
    info = json.loads((out / "_info.json").read_text())["splits"]["val"]
    samples = list(read_tar_samples(out / info["filenames"][0]).items())[:4]
    w = ShardTarWriter(tmp_path / "bad-000000.tar", fsync=False)
    (k0, s0), (k1, s1), (k2, s2), (k3, s3) = samples
    w.add(k0, {"jpg": s0["jpg"], "cls": s0["cls"]})
    w.add(k1, {"jpg": b"\xff\xd8 not a jpeg", "cls": s1["cls"]})  # undecodable
    w.add(k2, {"jpg": s2["jpg"]})  # no label
    w.add(k3, {"jpg": s3["jpg"], "cls": s3["cls"]})
    w.commit()
    (tmp_path / "bad.txt").write_text(f"bad-000000.tar 5\n{out / info['filenames'][1]}\n")  # 5: one sample lost
    st = {}
    with caplog.at_level(logging.WARNING):
        f, y, _ = extract_features(tiny_backbone(), tmp_path / "bad.txt", 32, batch_size=2, stats=st)
    n2 = info["shard_lengths"][1]
    assert st == {"n": 2 + n2, "n_corrupt": 3} and len(y) == f.shape[0] == 2 + n2
    assert [int(s0["cls"]), int(s3["cls"])] == y[:2].tolist()
    text = caplog.text
    assert "skipped 3 corrupt" in text and "no 'cls' member" in text and "missing" in text


def test_invariance_images_from_shards(trees):
    src, out = trees
    sel = ShardImages(f"{out}#val", limit=8)
    assert len(sel) == 8 and sel.indices == [i * 10 for i in range(8)]
    imgs = list(iter_rgb(sel))
    assert all(im is not None and im.size == (32, 32) for im in imgs)
    # the bytes are the folder's: every decoded shard image is pixel-equal to one folder image
    folder = {np.asarray(load_rgb(p)).tobytes() for p, _ in scan_folder(src / "val")[0]}
    assert all(np.asarray(im).tobytes() in folder for im in imgs)


def test_periodic_knn_during_training_from_shards(trees, tmp_path, capsys, monkeypatch):
    from sere_scale.cli import main
    from sere_scale.engine.ddp import DDPEngine
    from sere_scale.run.train import train
    from tests.tiny import tiny_config
    src, out = trees
    run = tmp_path / "run"
    gathers = []  # k-NN and invariance on the same step share one gather of the teacher
    real = DDPEngine.teacher_state_dict
    monkeypatch.setattr(DDPEngine, "teacher_state_dict", lambda self: gathers.append(1) or real(self))
    train(tiny_config(run, "", f"data.shards={out}", "train.max_steps=3", "data.batch_size=8",
                      "checkpoint.every_steps=2", "eval.knn_every=2", f"eval.knn_train_path={out}",
                      f"eval.val_path={out}#val", "eval.knn_k=10", "eval.invariance_every=2",
                      "eval.invariance_images=8"))
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "step" in r and "loss" in r]
    assert [("knn_top1" in r) for r in recs] == [False, True, False]
    assert len(gathers) == 1
    r = recs[1]
    assert 0 <= r["knn_top1"] <= r["knn_top5"] <= 100 and 0 < r["invariance_spatial"] < 1
    # the teacher of that step, through the command, on the same shards: the same accuracy
    argv = ["knn", "--checkpoint", str(run / "checkpoints" / "step_00000002"), "--train-data", str(out),
            "--val-data", f"{out}#val", "--k", "10", "--batch-size", "8"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["top1"] == pytest.approx(r["knn_top1"]) and res["n_train"] == 240 and res["n_val"] == 80


def test_knn_every_needs_both_paths():
    from sere_scale.config.load import ConfigError, load_config
    with pytest.raises(ConfigError, match="knn_train_path"):
        load_config(None, ["eval.knn_every=5", "eval.val_path=x"])
