"""ShardLoader: disjoint equal-step ranks × workers, exact resume, corrupt/truncated accounting, shard specs, and
encoded batches (data.augment=gpu: stored bytes + masks, decoded and multi-cropped by DeviceAugment)."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from data_plane_fixtures import jpeg_bytes, make_tree, noisy_rgb, read_tar_samples, run_prep
from PIL import Image

from sere_scale.data import shards as shards_mod
from sere_scale.data.encoded import DeviceAugment, EncodedSSLTransform, split_encoded
from sere_scale.data.fastcrop import FastMultiCrop
from sere_scale.data.gpu_multicrop import GPUMultiCrop
from sere_scale.data.masking import MaskGenerator
from sere_scale.data.multicrop import MultiCrop
from sere_scale.data.shardlist import ShardSpecError, resolve_shards
from sere_scale.data.shards import ShardLoader
from sere_scale.data.transform import SSLTransform, sample_rng


class MeanColour:
    """Test transform: the decoded image's mean colour as a 1×1 'crop' (identifies the image it came from)."""

    def __call__(self, img):
        x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32)).mean((0, 1)).view(3, 1, 1)
        return {"crops": [x], "boxes": torch.zeros(1, 4), "flips": torch.zeros(1, dtype=torch.bool),
                "masks": torch.zeros(1, 1, 1, dtype=torch.bool)}


def mean_colour(jpg: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(jpg)) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32)).mean((0, 1))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """42 images in 11 shards (3 or 4 each); reference: global id → (label, mean colour, stored jpg bytes) read
    with tarfile."""
    src = tmp_path_factory.mktemp("src")
    make_tree(src, per_class=14, specials=False)
    out = tmp_path_factory.mktemp("shards")
    run_prep("imagenet", src, out, "--shard-size", 4, "--workers", 2, "--quiet")
    info = json.loads((out / "_info.json").read_text())["splits"]["train"]
    ref = []
    for f in info["filenames"]:  # global ids follow _info.json order, then the order inside each tar
        for s in read_tar_samples(out / f).values():
            ref.append((int(s["cls"]), mean_colour(s["jpg"]), s["jpg"]))
    return out, ref


def run_epoch(loader, epoch=0, start=0):
    return list(loader.epoch_iter(epoch, start))


def ids(batches):
    return [b["index"].tolist() for b in batches]


def check_identity(batches, ref):
    for b in batches:
        for i, gid in enumerate(b["index"].tolist()):
            assert b["labels"][i].item() == ref[gid][0]
            assert torch.allclose(b["crops"][0][i].view(3), ref[gid][1], atol=1e-3), f"sample {gid} mixed up"


def test_two_ranks_two_workers_disjoint_cover_equal_steps(shards):
    out, ref = shards
    B, world = 3, 2
    for epoch in (0, 1):
        seen, steps = [], []
        for rank in range(world):
            ld = ShardLoader(str(out), MeanColour(), B, rank, world, seed=5, num_workers=2, shuffle_buffer=4)
            batches = run_epoch(ld, epoch)
            steps.append(len(batches))
            assert len(batches) == ld.batches_per_epoch == len(ref) // (world * B)
            assert all(len(b["index"]) == B and b["n_corrupt"] == 0 for b in batches)
            check_identity(batches, ref)
            seen += [i for b in ids(batches) for i in b]
        assert steps[0] == steps[1]
        assert len(seen) == len(set(seen)), "a sample was given to two ranks/workers"
        assert set(seen) <= set(range(len(ref))) and len(ref) - len(seen) < world * B
    e0 = [ids(run_epoch(ShardLoader(str(out), MeanColour(), B, 0, world, 5, 2, shuffle_buffer=4), e)) for e in (0, 1)]
    assert e0[0] != e0[1], "epochs should be shuffled differently"


@pytest.mark.parametrize("workers,crop", [(0, MultiCrop), (2, FastMultiCrop)])
def test_resume_at_batch_k_gives_identical_remaining_batches(shards, workers, crop):
    out, _ = shards
    tf = SSLTransform(crop(32, 16, 2, 2), patch_size=8, masks=MaskGenerator(0.5))

    def make():
        return ShardLoader(str(out), tf, 2, 1, 2, seed=7, num_workers=workers, shuffle_buffer=5)

    full = run_epoch(make(), 3)
    assert len(full) == 10
    for k in (1, 5, 9):
        ld = make()
        it = ld.epoch_iter(3)
        for _ in range(k):
            next(it)
        state = ld.state_dict()
        del it
        again = make()
        again.load_state_dict(state)
        assert again.position == (3, k)
        rest = list(again.epoch_iter(*again.position))
        assert ids(rest) == ids(full[k:])
        for a, b in zip(rest, full[k:]):  # same crops, boxes, flips, masks: augmentation is reproduced too
            assert all(torch.equal(x, y) for x, y in zip(a["crops"], b["crops"]))
            assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["masks"], b["masks"])
    with pytest.raises(ValueError, match="streams"):
        ShardLoader(str(out), tf, 2, 1, 2, seed=7, num_workers=workers + 2, shuffle_buffer=5).load_state_dict(state)


def test_resume_skips_consumed_shards_without_opening_them(shards, monkeypatch):
    out, _ = shards
    opened = []
    real = shards_mod.iter_piece

    def counting(url, lo, hi, want):
        opened.append(url)
        return real(url, lo, hi, want)

    monkeypatch.setattr(shards_mod, "iter_piece", counting)
    ld = ShardLoader(str(out), MeanColour(), 2, 0, 1, seed=1, num_workers=0, shuffle_buffer=3)
    run_epoch(ld, 0)
    n_all = len(set(opened))
    opened.clear()
    tail = run_epoch(ld, 0, ld.batches_per_epoch - 1)
    assert len(tail) == 1 and len(set(opened)) < n_all / 2


def _write_tar(path: Path, samples, cut_after=None) -> list[int]:
    """Write samples [(key, {ext: bytes})]; return the byte offset after each sample."""
    ends = []
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, members in samples:
            for ext, data in members.items():
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
            ends.append(tf.offset)
    return ends


@pytest.mark.parametrize("via_pipe,encoded", [(False, False), (True, False), (False, True)])
def test_corrupt_missing_and_truncated_samples_are_counted(tmp_path, via_pipe, encoded):
    good_ids, lines = set(), []
    gid = 0
    for s in range(4):
        samples = []
        for j in range(5):
            data = jpeg_bytes(noisy_rgb(100 + gid))
            members = {"jpg": data, "cls": b"1"}
            if s == 1 and j == 2:
                members["jpg"] = b"\xff\xd8 this is not a JPEG"
            elif s == 0 and j == 4:
                members["jpg"] = b""
            elif s == 2 and j == 0:
                members = {"cls": b"1", "txt": b"no image"}
            elif not (s == 3 and j >= 3):
                good_ids.add(gid)
            samples.append((f"s{s}_{j:03d}", members))
            gid += 1
        p = tmp_path / f"shard-{s}.tar"
        ends = _write_tar(p, samples)
        if s == 3:  # cut inside sample 3's image data: samples 3 and 4 are lost
            p.write_bytes(p.read_bytes()[: ends[2] + 700])
        lines.append(f"{'pipe:cat ' + str(p) if via_pipe else p.name} 5")
    (tmp_path / "shards.txt").write_text("# url count\n" + "\n".join(lines) + "\n")
    tf = EncodedSSLTransform(2, 32, 8, MaskGenerator(0.5)) if encoded else MeanColour()
    ld = ShardLoader(str(tmp_path / "shards.txt"), tf, 4, 0, 1, seed=0, num_workers=0)
    batches = run_epoch(ld)
    assert len(batches) == ld.batches_per_epoch == 5
    if encoded:  # the loader counts the missing and truncated samples; the device the 2 undecodable ones
        assert sum(b["n_corrupt"] for b in batches) == 3
        aug = DeviceAugment(GPUMultiCrop(32, 16, 2, 2), seed=0)
        batches = [aug(b, 0, k) for k, b in enumerate(batches)]
        assert all(len(b["index"]) == len(b["labels"]) == len(b["masks"]) == len(b["crops"][0]) for b in batches)
    assert sum(b["n_corrupt"] for b in batches) == 5
    # every slot kept: a corrupt sample's slot holds a readable sample of the same batch
    assert all(len(b) == 4 for b in ids(batches))
    assert set(i for b in ids(batches) for i in b) == good_ids
    assert sum(len(b) - len(set(b)) for b in ids(batches)) == 5


def test_encoded_batches_hold_the_stored_bytes_and_resume_exactly(shards):
    """data.augment=gpu: each batch holds exactly the bytes stored in the tar for its indices, the labels, and
    the iBOT masks the folder encoded path makes for that sample seed; same plan and resume as the CPU path."""
    out, ref = shards
    tf = EncodedSSLTransform(2, 32, 8, MaskGenerator(0.5))
    B, world, seed, epoch = 3, 2, 5, 1
    n_masked = 0
    for rank in range(world):
        def make(transform):
            return ShardLoader(str(out), transform, B, rank, world, seed=seed, num_workers=2, shuffle_buffer=4)
        enc, cpu = make(tf), make(MeanColour())
        assert enc.encoded and not cpu.encoded
        batches = run_epoch(enc, epoch)
        assert len(batches) == enc.batches_per_epoch == cpu.batches_per_epoch
        assert ids(batches) == ids(run_epoch(cpu, epoch))  # same samples in the same order as the CPU path
        for b in batches:
            assert set(b) == {"encoded", "encoded_sizes", "masks", "labels", "index", "n_corrupt"}
            assert b["encoded"].dtype == torch.uint8 and b["n_corrupt"] == 0 and b["masks"].shape == (B, 2, 4, 4)
            for i, (img, gid) in enumerate(zip(split_encoded(b), b["index"].tolist())):
                assert img.numpy().tobytes() == ref[gid][2], f"sample {gid}: bytes differ from the tar's"
                assert b["labels"][i].item() == ref[gid][0]
                with sample_rng(seed, epoch, gid):  # EncodedImageFolder's recipe, with the global id
                    assert torch.equal(b["masks"][i], tf(b"")["masks"])
                n_masked += int(b["masks"][i].any())
        for k in (1, len(batches) - 1):  # resume at batch k: identical remaining batches
            rest = run_epoch(make(tf), epoch, k)
            assert len(rest) == len(batches) - k
            for a, c in zip(rest, batches[k:]):
                assert all(torch.equal(a[key], c[key]) for key in ("encoded", "encoded_sizes", "masks", "labels",
                                                                  "index"))
    assert n_masked > 0


def test_too_few_shards_for_ranks_x_workers_is_a_clear_error(shards):
    out, _ = shards
    with pytest.raises(ValueError, match="11 shards for 4 ranks x 3 reader streams"):
        ShardLoader(str(out), MeanColour(), 1, 0, 4, 0, num_workers=3)
    with pytest.raises(ValueError, match="not one batch"):
        ShardLoader(str(out), MeanColour(), 64, 0, 1, 0)
    ShardLoader(str(out), MeanColour(), 1, 0, 4, 0, num_workers=3, resampled=True)  # draws: no such limit


def test_resampled_mode_equal_steps_deterministic_and_resumable(shards):
    out, ref = shards

    def make(rank):
        return ShardLoader(str(out), MeanColour(), 4, rank, 2, seed=2, num_workers=2, resampled=True)

    a, b = run_epoch(make(0), 4), run_epoch(make(1), 4)
    assert len(a) == len(b) == make(0).batches_per_epoch == 5
    check_identity(a + b, ref)
    assert ids(a) == ids(run_epoch(make(0), 4)) and ids(a) != ids(run_epoch(make(0), 5))
    assert ids(run_epoch(make(0), 4, 3)) == ids(a[3:])


def test_shard_specs_agree(shards, tmp_path):
    out, ref = shards
    info = json.loads((out / "_info.json").read_text())["splits"]["train"]
    via_dir, via_json = resolve_shards(str(out)), resolve_shards(str(out / "_info.json") + "#train")
    n = len(info["filenames"])
    pattern = str(out / f"imagenet-train-{{000000..{n - 1:06d}}}.tar")
    via_pattern = resolve_shards(pattern)
    (tmp_path / "l.txt").write_text("".join(f"{out / f}\n" for f in info["filenames"]))
    via_list = resolve_shards(str(tmp_path / "l.txt"))  # counts read from the tars themselves
    for s in (via_json, via_pattern, via_list):
        assert s.urls == via_dir.urls and s.counts == via_dir.counts
    assert list(via_dir.counts) == info["shard_lengths"] and via_dir.total == len(ref)
    with pytest.raises(ShardSpecError, match="no sample counts"):
        resolve_shards(f"pipe:cat {pattern}")
    with pytest.raises(ShardSpecError, match="split 'val'"):
        resolve_shards(str(out) + "#val")


def test_persistent_workers_serve_every_epoch_and_resume_as_fresh_workers_do(shards):
    """One set of workers for all epochs (data/workers.py) gives the batches a fresh set per epoch gives, also after
    an epoch left half-read, and at a resume position."""
    out, ref = shards
    ld = ShardLoader(str(out), MeanColour(), 3, 1, 2, seed=4, num_workers=2, shuffle_buffer=4)
    got, pids = {}, set()
    try:
        for e, start in ((0, 0), (1, 0), (0, 2), (2, 1)):
            half = ld.epoch_iter(e + 5)
            next(half)  # an epoch abandoned after one batch
            got[(e, start)] = run_epoch(ld, e, start)
            pids.update(ld.workers.pids)
        assert len(pids) == 2 and 0 not in pids
    finally:
        ld.close()
    for (e, start), batches in got.items():
        fresh = ShardLoader(str(out), MeanColour(), 3, 1, 2, seed=4, num_workers=2, shuffle_buffer=4)
        want = run_epoch(fresh, e, start)
        fresh.close()
        assert ids(batches) == ids(want) and len(want) == ld.batches_per_epoch - start, (e, start)
        check_identity(batches, ref)
