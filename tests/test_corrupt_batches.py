"""Every batch holds exactly data.batch_size samples whatever the data: a corrupt sample's slot takes the next
readable sample of its batch, an all-corrupt batch a deterministic fallback; folder, shards, encoded batches
(data.augment=gpu) and MoCo v3 on 2 ranks (whose key all_gather needs equal batch sizes)."""
import io
import json
import random
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch
from PIL import Image

from sere_scale.data.corrupt import Corrupt, NoReadableSample, fill_corrupt, fill_slots
from sere_scale.data.encoded import DeviceAugment, EncodedSSLTransform, collate_encoded
from sere_scale.data.gpu_multicrop import GPUMultiCrop
from sere_scale.data.loader import build_train_loader
from sere_scale.data.sampler import ResumableDistributedSampler
from sere_scale.data.shards import ShardLoader
from sere_scale.run.metrics import read_metrics
from sere_scale.run.train import train
from tests.conftest import ROOT, subprocess_env
from tests.tiny import tiny_config, tiny_overrides


def reference_fill(bad: list[bool]) -> list[int]:
    """Slot i takes itself if readable, else the first readable slot after it, wrapping around."""
    n = len(bad)
    out = []
    for i in range(n):
        j = i
        while bad[j % n]:
            j += 1
        out.append(j % n)
    return out


def test_fill_rule_against_the_written_out_rule():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 9)
        bad = [rng.random() < 0.5 for _ in range(n)]
        if all(bad):
            bad[rng.randrange(n)] = False
        samples = [None if b else {"id": i} for i, b in enumerate(bad)]
        filled, n_bad = fill_corrupt(samples)
        assert [s["id"] for s in filled] == reference_fill(bad) and n_bad == sum(bad)
        kept = [i for i, b in enumerate(bad) if not b]
        assert [kept[k] for k in fill_slots(kept, n)] == reference_fill(bad)
    # all corrupt: the marker's fallback, in every slot; without one, a clear error
    filled, n_bad = fill_corrupt([Corrupt(3, lambda: {"id": "fb"}), None])
    assert filled == [{"id": "fb"}] * 2 and n_bad == 2
    with pytest.raises(NoReadableSample):
        fill_corrupt([None, None])


def _png(v: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (v, 255 - v, (3 * v) % 256)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def mostly_corrupt(tmp_path):
    """16 one-image classes (label = file index); only 2 readable, both in batch 0 of epoch 0 (batch 8, seed 0), so
    batch 1 is all corrupt."""
    n, B = 16, 8
    order = ResumableDistributedSampler(n, B, 0, 1, seed=0).indices()
    good = set(order[:2])
    root = tmp_path / "data"
    for i in range(n):
        (root / f"c{i:02d}").mkdir(parents=True)
        (root / f"c{i:02d}" / "x.png").write_bytes(_png(10 * i) if i in good else b"broken" * (i + 1))
    return root, order, good


def test_an_all_corrupt_folder_batch_takes_the_next_readable_file(mostly_corrupt, tmp_path):
    root, order, good = mostly_corrupt
    cfg = tiny_config(tmp_path / "run", root, "train.max_steps=2", "train.log_every=2")
    batches = list(build_train_loader(cfg).epoch_iter(0, 0))
    assert [len(b["labels"]) for b in batches] == [8, 8] and [b["n_corrupt"] for b in batches] == [6, 8]
    assert all(len(c) == 8 for b in batches for c in b["crops"])
    b0 = order[:8]
    assert batches[0]["labels"].tolist() == [b0[j] for j in reference_fill([i not in good for i in b0])]
    first = order[8]  # the all-corrupt batch: the next readable file after its first one, in file order
    fallback = next((first + k) % 16 for k in range(1, 16) if (first + k) % 16 in good)
    assert batches[1]["labels"].tolist() == [fallback] * 8
    assert train(cfg)["step"] == 2  # today's collate returned crops: [] here and the run crashed
    assert read_metrics(tmp_path / "run")[-1]["n_corrupt"] == 14


class Colour:
    """Test transform: the image's mean colour as a 1x1 crop."""

    def __call__(self, img):
        x = torch.tensor(img.convert("RGB").resize((1, 1)).getpixel((0, 0)), dtype=torch.float32).view(3, 1, 1)
        return {"crops": [x], "boxes": torch.zeros(1, 4), "flips": torch.zeros(1, dtype=torch.bool),
                "masks": torch.zeros(1, 1, 1, dtype=torch.bool)}


def test_an_all_corrupt_shard_batch_takes_the_streams_first_readable_sample(tmp_path):
    lines = []
    for s in range(2):  # shard 0: samples 0, 1 without an image, 2, 3 readable; shard 1: all readable
        with tarfile.open(tmp_path / f"p{s}.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
            for j in range(4):
                members = {"txt": b"x"} if s == 0 and j < 2 else {"png": _png(40 * s + 10 * j)}
                for ext, blob in members.items():
                    ti = tarfile.TarInfo(f"s{s}_{j}.{ext}")
                    ti.size = len(blob)
                    tf.addfile(ti, io.BytesIO(blob))
        lines.append(f"p{s}.tar 4\n")
    (tmp_path / "shards.txt").write_text("".join(lines))
    ld = ShardLoader(str(tmp_path / "shards.txt"), Colour(), 2, 0, 1, seed=0, num_workers=0, shuffle=False)
    batches = list(ld.epoch_iter(0, 0))
    assert [b["index"].tolist() for b in batches] == [[2, 2], [2, 3], [4, 5], [6, 7]]
    assert [b["n_corrupt"] for b in batches] == [2, 0, 0, 0]
    assert torch.equal(batches[0]["crops"][0][0], batches[1]["crops"][0][0])  # the very sample 2
    assert [b["index"].tolist() for b in ld.epoch_iter(0, 1)] == [[2, 3], [4, 5], [6, 7]]  # resume: same


def test_undecodable_encoded_images_keep_their_slot_on_the_device():
    tf = EncodedSSLTransform(2, 32, 8, None)
    blobs = [_png(10), b"garbage" * 9, _png(90), b"", _png(200), b"\x89PNG broken"]
    samples = [{**tf(b), "label": i, "index": 100 + i} for i, b in enumerate(blobs)]
    batch = collate_encoded(samples)
    aug = DeviceAugment(GPUMultiCrop(32, 16, 2, 2), seed=0)
    out = aug(batch, 0, 0)
    ref = reference_fill([False, True, False, True, False, True])
    assert out["labels"].tolist() == ref and out["index"].tolist() == [100 + i for i in ref]
    assert out["n_corrupt"] == 3 and all(len(c) == 6 for c in out["crops"]) and len(out["masks"]) == 6
    assert torch.equal(out["crops"][0][1], out["crops"][0][2])  # slot 1 holds image 2's crops
    # a batch where nothing decodes takes the previous readable batch's images (none yet: a clear error)
    bad = collate_encoded([{**tf(b"junk"), "label": 0, "index": 0}] * 6)
    again = aug(bad, 0, 1)
    assert again["n_corrupt"] == 6 and again["labels"].tolist() == ref and all(len(c) == 6 for c in again["crops"])
    assert torch.equal(again["crops"][0], aug(batch, 0, 1)["crops"][0])  # cropped with this batch's seed
    with pytest.raises(NoReadableSample):
        DeviceAugment(GPUMultiCrop(32, 16, 2, 2), seed=0)(bad, 0, 0)


def test_mocov3_with_corrupt_images_on_two_ranks(tmp_path, digits_root):
    """32 images, 8 of them corrupt, batch 4 on 2 ranks: ranks' batches would differ in size without the fill
    (MoCo v3's key all_gather then fails); with it the ranks stay in sync and every corrupt image is counted."""
    data = tmp_path / "data"
    n = 0
    for c in sorted((digits_root / "train").iterdir())[:4]:
        (data / c.name).mkdir(parents=True)
        for k, f in enumerate(sorted(c.iterdir())[:8]):
            dst = data / c.name / f.name
            if k in (1, 5) :
                dst.write_bytes(b"corrupt" * (k + 1))
            else:
                shutil.copy(f, dst)
            n += 1
    assert n == 32
    report = tmp_path / "report.json"
    overrides = tiny_overrides(tmp_path / "run", data, "train.max_steps=4", "data.batch_size=4",
                               "image_loss.kind=mocov3", "image_loss.moco_hidden_dim=32",
                               "image_loss.moco_out_dim=16")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist" / "ddp_run.py"), str(report), *overrides]
    try:
        res = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"2-rank MoCo v3 run hung: {(e.stderr or b'')[-3000:]}")
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads(report.read_text())
    assert rep["step"] == 4 and rep["max_diff"]["student"] == 0.0 and rep["max_diff"]["teacher"] == 0.0
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["n_corrupt"] == 8  # one epoch: every image
