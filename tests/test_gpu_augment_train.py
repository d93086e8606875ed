"""data.augment=gpu end to end on the CPU: encoded folder and shard batches, device augmentation in the training
loop, exact resume, corrupt files counted."""
import io
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from sere_scale.data.encoded import DeviceAugment, split_encoded
from sere_scale.data.loader import build_train_loader
from sere_scale.data.shards import ShardLoader
from sere_scale.run.metrics import read_metrics
from sere_scale.run.train import train
from tests.test_train import crashing
from tests.tiny import tiny_config


@pytest.fixture(scope="module")
def jpeg_data(tmp_path_factory, digits_root):
    """3 classes × 12 digits as JPEG, one PNG kept (goes through the fallback)."""
    root = tmp_path_factory.mktemp("jpeg")
    for c in sorted((digits_root / "train").iterdir())[:3]:
        (root / c.name).mkdir()
        for i, f in enumerate(sorted(c.iterdir())[:12]):
            if c.name.endswith("0") and i == 0:
                shutil.copy(f, root / c.name / f.name)
            else:
                Image.open(f).convert("RGB").save(root / c.name / (f.stem + ".jpg"), quality=90)
    return root


def test_encoded_batches_and_device_augment(tmp_path, jpeg_data):
    cfg = tiny_config(tmp_path, jpeg_data, "data.augment=gpu", "data.batch_size=6")
    loader = build_train_loader(cfg)
    batch = next(loader.epoch_iter(0, 0))
    assert set(batch) >= {"encoded", "encoded_sizes", "masks", "labels", "n_corrupt"} and "crops" not in batch
    images = split_encoded(batch)
    files = [p for p, _ in loader.dataset.items]
    order = batch["index"].tolist()
    assert len(images) == 6 and all(im.dtype == torch.uint8 for im in images)
    assert all(im.numpy().tobytes() == Path(files[i]).read_bytes() for im, i in zip(images, order))
    assert batch["masks"].shape == (6, 2, 4, 4)  # 32 px globals, patch 8
    aug = DeviceAugment.from_config(cfg, torch.device("cpu"))
    out = aug(batch, 0, 0)
    assert [c.shape for c in out["crops"]] == [(6, 3, 32, 32)] * 2 + [(6, 3, 16, 16)] * 2
    assert out["boxes"].shape == (6, 4, 4) and out["flips"].shape == (6, 4) and "encoded" not in out
    listed = aug(dict(batch, encoded=images), 0, 0)  # a list of tensors is accepted too
    assert all(torch.equal(a, b) for a, b in zip(out["crops"], listed["crops"]))
    assert torch.equal(out["labels"], batch["labels"]) and out["n_corrupt"] == 0
    again = aug(next(loader.epoch_iter(0, 0)), 0, 0)  # (epoch, batch) fixes the crops
    assert all(torch.equal(a, b) for a, b in zip(out["crops"], again["crops"]))
    other = aug(batch, 0, 1)
    assert not torch.equal(out["boxes"], other["boxes"])
    rank1 = DeviceAugment.from_config(cfg, torch.device("cpu"), rank=1)(batch, 0, 0)
    assert not torch.equal(out["boxes"], rank1["boxes"])  # ranks draw independent augmentations


def test_training_with_gpu_augment_resumes_exactly(tmp_path, jpeg_data, monkeypatch):
    extra = ["train.max_steps=5", "data.batch_size=4", "data.augment=gpu"]
    calls = []
    orig = DeviceAugment.__call__

    def spy(self, batch, epoch, index):
        calls.append((epoch, index))
        out = orig(self, batch, epoch, index)
        calls[-1] += (self.multicrop.stats.device, self.multicrop.stats.fallback)
        return out
    with monkeypatch.context() as m:
        m.setattr(DeviceAugment, "__call__", spy)
        ref = train(tiny_config(tmp_path / "ref", jpeg_data, *extra))
    assert ref["step"] == 5 and [c[:2] for c in calls] == [(0, i) for i in range(5)]
    assert calls[-1][2] >= 19 and calls[-1][3] <= 1  # JPEGs on the batched decoder; the PNG (if drawn) via PIL
    run = tmp_path / "crash"
    with pytest.raises(KeyboardInterrupt):  # dies in step 5; checkpoint at step 3 (tiny: every 3 steps)
        train(tiny_config(run, jpeg_data, *extra), method_cls=crashing(4))
    train(tiny_config(run, jpeg_data, *extra), resume=True)
    a, b = read_metrics(tmp_path / "ref"), read_metrics(run)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]  # steps 4 and 5 from the resumed run
    for ra, rb in zip(a, b):
        for k in ("loss", "loss_image", "loss_spatial", "loss_channel", "grad_norm"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-7), (ra["step"], k)


def test_corrupt_files_counted_with_gpu_augment(tmp_path, jpeg_data):
    data = tmp_path / "data"
    shutil.copytree(jpeg_data, data)
    first = min(data.iterdir())
    (first / "zero.jpg").write_bytes(b"")
    good = min(first.glob("*.jpg")).read_bytes()
    (first / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (first / "garbage.png").write_bytes(b"not an image at all" * 10)
    cfg = tiny_config(tmp_path / "run", data, "data.batch_size=13", "train.max_steps=3", "train.log_every=3",
                      "data.augment=gpu")
    train(cfg)
    assert read_metrics(tmp_path / "run")[-1]["n_corrupt"] == 3


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory, jpeg_data):
    """3 tar shards of 8 samples listed in shards.txt: 21 of the images above (the PNG among them) and 3 bad
    samples: a zero-byte jpg, a jpg of garbage bytes (both dropped on the device) and one without an image
    member (dropped by the loader). 24 samples, so with batch 4 every epoch uses all of them."""
    classes = sorted(d.name for d in jpeg_data.iterdir())
    files = sorted(f for d in jpeg_data.iterdir() for f in d.iterdir())
    files = [files[i] for i in range(0, len(files), 3)] + [files[i] for i in range(1, len(files), 3)][:9]
    samples = [{f.suffix[1:]: f.read_bytes(), "cls": str(classes.index(f.parent.name)).encode()} for f in files]
    samples[3:3] = [{"jpg": b"", "cls": b"0"}]
    samples[11:11] = [{"jpg": b"not a jpeg at all" * 10, "cls": b"1"}]
    samples[20:20] = [{"cls": b"2", "txt": b"no image"}]
    assert len(samples) == 24 and any("png" in m for m in samples)
    root = tmp_path_factory.mktemp("jpeg_shards")
    lines = []
    for s in range(3):
        with tarfile.open(root / f"part-{s}.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
            for j, members in enumerate(samples[8 * s: 8 * s + 8]):
                for ext, data in members.items():
                    ti = tarfile.TarInfo(f"s{s}_{j:03d}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
        lines.append(f"part-{s}.tar 8\n")
    (root / "shards.txt").write_text("".join(lines))
    return root / "shards.txt"


def test_training_from_shards_with_gpu_augment_counts_corrupt_and_resumes_exactly(tmp_path, jpeg_shards):
    extra = ["data.path=", f"data.shards={jpeg_shards}", "train.max_steps=7", "data.batch_size=4",
             "data.augment=gpu"]
    loader = build_train_loader(tiny_config(tmp_path / "ref", "", *extra))
    assert isinstance(loader, ShardLoader) and loader.encoded and loader.batches_per_epoch == 6
    batches = list(loader.epoch_iter(0, 0))
    assert sum(b["n_corrupt"] for b in batches) == 1  # the sample without an image; the device drops 2 more
    assert all(len(b["index"]) == 4 for b in batches) and all("encoded" in b for b in batches)  # slot kept
    ref = train(tiny_config(tmp_path / "ref", "", *extra))
    assert ref["step"] == 7
    a = read_metrics(tmp_path / "ref")
    assert a[5]["step"] == 6 and a[5]["n_corrupt"] == 3  # epoch 0 (steps 1-6) holds all 24 samples
    run = tmp_path / "crash"
    with pytest.raises(KeyboardInterrupt):  # dies in step 5; checkpoint at step 3 (tiny: every 3 steps)
        train(tiny_config(run, "", *extra), method_cls=crashing(4))
    train(tiny_config(run, "", *extra), resume=True)  # steps 4-7: the rest of epoch 0, then epoch 1
    b = read_metrics(run)
    assert [r["step"] for r in b] == list(range(1, 8)) and b[-1]["epoch"] == a[-1]["epoch"] >= 1
    for ra, rb in zip(a, b):
        assert ra["n_corrupt"] == rb["n_corrupt"], ra["step"]
        for k in ("loss", "loss_image", "loss_spatial", "loss_channel", "grad_norm"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-7), (ra["step"], k)
