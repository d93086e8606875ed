"""sere-prep: ImageNet tree → WebDataset shards (round trip, timm, determinism, kill/resume, checks, arrays)."""
from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from data_plane_fixtures import PY, ROOT, jpeg_bytes, make_tree, noisy_rgb, read_tar_samples, run_prep
from PIL import Image

from data_prep.convert import STALL_ENV
from data_prep.imagecheck import prepare_image


def all_samples(out: Path, split: str = "train") -> dict[str, dict]:
    """key → sample dict (with the shard name) over every tar in OUT for ``split``."""
    res = {}
    for t in sorted(out.glob(f"imagenet-{split}-*.tar")):
        for k, s in read_tar_samples(t).items():
            assert k not in res, f"sample {k} appears twice ({t.name})"
            s["shard"] = t.name
            res[k] = s
    return res


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    return root, make_tree(root)


@pytest.fixture(scope="module")
def converted(tree, tmp_path_factory):
    src, meta = tree
    out = tmp_path_factory.mktemp("out")
    r = run_prep("imagenet", src, out, "--shard-size", 4, "--workers", 2, "--seed", 3)
    return src, meta, out, json.loads(r.stdout.strip().splitlines()[-1])


def test_round_trip_every_input_once_with_label_and_bytes(converted):
    src, meta, out, summary = converted
    classes = sorted(p.name for p in (src / "train").iterdir())
    samples = all_samples(out)
    by_path = {}
    for s in samples.values():
        m = json.loads(s["json"])
        assert m["path"] not in by_path, f"{m['path']} stored twice"
        by_path[m["path"]] = s
    assert set(by_path) == set(meta["good"]), "stored inputs differ from the decodable inputs"
    for rel, wnid in meta["good"].items():
        s, m = by_path[rel], json.loads(by_path[rel]["json"])
        assert int(s["cls"]) == classes.index(wnid) and m["wnid"] == wnid
        orig = (src / rel).read_bytes()
        with Image.open(io.BytesIO(orig)) as im:
            assert (m["width"], m["height"]) == im.size
            ref = im.convert("L" if im.mode == "L" else "RGB")
        kind = meta["kinds"][rel]
        if kind in ("rgb", "gray"):
            assert s["jpg"] == orig, f"{rel}: baseline JPEG bytes were changed"
        else:  # re-encoded: a baseline JPEG showing the same picture
            assert s["jpg"] != orig
            with Image.open(io.BytesIO(s["jpg"])) as im:
                assert im.format == "JPEG" and not im.info.get("progressive") and im.mode in ("RGB", "L")
                diff = np.abs(np.asarray(im.convert(ref.mode), np.float32) - np.asarray(ref, np.float32))
                assert diff.mean() < 4.0, f"{rel} ({kind}): re-encoded image differs (mean {diff.mean():.1f})"
    assert summary["num_samples"] == len(meta["good"]) and summary["num_corrupt"] == len(meta["bad"])


def test_corrupt_inputs_reported_with_count(converted):
    _, meta, out, _ = converted
    rep = json.loads((out / "_report-train.json").read_text())
    assert rep["num_corrupt"] == len(meta["bad"]) == 3
    assert {c["path"] for c in rep["corrupt"]} == meta["bad"]
    assert all(c["reason"] for c in rep["corrupt"])
    assert rep["num_inputs"] == rep["num_samples"] + rep["num_corrupt"]
    kinds = {meta["kinds"][r["path"]] for r in rep["reencoded"]}
    assert kinds == {"cmyk", "png_alpha", "progressive"}


def test_info_json_and_timm_reader(converted):
    import timm.data
    _, meta, out, _ = converted
    info = json.loads((out / "_info.json").read_text())
    sp = info["splits"]["train"]
    lengths = {t: len(read_tar_samples(out / t)) for t in sp["filenames"]}
    assert [lengths[t] for t in sp["filenames"]] == sp["shard_lengths"]
    assert sp["num_samples"] == sum(sp["shard_lengths"]) == len(meta["good"])
    ds = timm.data.create_dataset("wds/imagenet", root=str(out), split="train", is_training=False, batch_size=1)
    got = [(img.size, int(t)) for img, t in ds]
    assert len(got) == len(meta["good"])
    classes = sorted({w for w in meta["good"].values()})
    want = sorted(((64, 48), classes.index(w)) for w in meta["good"].values())
    assert sorted(got) == want


def test_verify_ok_then_detects_damage(converted, tmp_path):
    _, _, out, _ = converted
    r = run_prep("verify", out, "--decode")
    assert json.loads(r.stdout)["ok"] is True
    dam = tmp_path / "damaged"
    subprocess.run(["cp", "-r", str(out), str(dam)], check=True)
    shard = sorted(dam.glob("imagenet-train-*.tar"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    r = run_prep("verify", dam, check=False)
    assert r.returncode == 1 and shard.name in r.stderr


def test_deterministic_for_seed_and_seeded_assignment(converted, tmp_path):
    src, _, out, _ = converted
    same, other = tmp_path / "same", tmp_path / "other"
    run_prep("imagenet", src, same, "--shard-size", 4, "--workers", 1, "--seed", 3, "--quiet")
    run_prep("imagenet", src, other, "--shard-size", 4, "--workers", 1, "--seed", 4, "--quiet")
    tars = sorted(p.name for p in out.glob("*.tar"))
    assert tars == sorted(p.name for p in same.glob("*.tar"))
    for t in tars:
        assert (out / t).read_bytes() == (same / t).read_bytes(), f"{t} differs for the same seed"
    a = {k: s["shard"] for k, s in all_samples(out).items()}
    b = {k: s["shard"] for k, s in all_samples(other).items()}
    assert set(a) == set(b) and a != b, "another seed should give another assignment of the same samples"


def test_rerun_with_other_settings_is_a_clear_error(converted):
    src, _, out, _ = converted
    r = run_prep("imagenet", src, out, "--shard-size", 5, "--seed", 3, check=False)
    assert r.returncode == 2 and "shard_size" in r.stderr and "different conversion" in r.stderr


def test_kill_9_mid_run_then_resume_completes_exactly(tree, converted, tmp_path):
    src, meta, ref_out, _ = converted
    out = tmp_path / "killed"
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **{STALL_ENV: "1"})
    cmd = [PY, "-m", "data_prep", "imagenet", str(src), str(out), "--shard-size", "4", "--workers", "2",
           "--seed", "3", "--quiet"]
    p = subprocess.Popen(cmd, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:  # each worker finishes one shard, then stalls half-way into the next
            done = list(out.glob("imagenet-train-*.tar")) if out.exists() else []
            tmps = list(out.glob("*.tar.tmp-*")) if out.exists() else []
            if len(done) >= 2 and len(tmps) >= 2:
                break
            assert p.poll() is None, "conversion ended before it could be killed"
            time.sleep(0.1)
        else:
            pytest.fail("the stall hook never stalled the conversion")
        time.sleep(0.3)
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    before = {t.name: (t.stat().st_ino, t.stat().st_mtime_ns) for t in out.glob("imagenet-train-*.tar")}
    n_shards = len(json.loads((ref_out / "_info.json").read_text())["splits"]["train"]["filenames"])
    assert 2 <= len(before) < n_shards and not (out / "_info.json").exists()
    r = run_prep("imagenet", src, out, "--shard-size", 4, "--workers", 2, "--seed", 3, "--quiet")
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["converted_shards"] == n_shards - len([n for n in before if (out / "_parts-train" /
                                                                                f"{n}.json").exists()])
    for name, st in before.items():  # completed shards were kept, not rewritten
        t = out / name
        assert (t.stat().st_ino, t.stat().st_mtime_ns) == st, f"{name} was redone"
    assert not list(out.glob("*.tmp-*")) and not list((out / "_parts-train").glob("*.tmp-*"))
    got, ref = all_samples(out), all_samples(ref_out)  # all_samples asserts no key twice
    assert {k: s["jpg"] for k, s in got.items()} == {k: s["jpg"] for k, s in ref.items()}
    paths = sorted(json.loads(s["json"])["path"] for s in got.values())
    assert paths == sorted(meta["good"])
    assert json.loads(run_prep("verify", out).stdout)["ok"]


def test_array_tasks_then_merge_equal_single_run(converted, tmp_path):
    src, _, ref_out, _ = converted
    out = tmp_path / "array"
    env = {"PYTHON": PY, "SRC": str(src), "OUT": str(out), "SPLIT": "train", "SHARD_SIZE": "4", "SEED": "3",
           "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_CPUS_PER_TASK": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(["bash", str(ROOT / "slurm" / "plan_imagenet.sbatch")], capture_output=True, text=True,
                       check=False, env=dict(os.environ, **env))
    assert r.returncode == 0, r.stderr
    assert (out / "_plan-train.json").exists() and not list(out.glob("*.tar"))
    for task in ("1", "0"):
        r = subprocess.run(["bash", str(ROOT / "slurm" / "convert_imagenet.sbatch")], capture_output=True,
                           text=True, check=False, env=dict(os.environ, **env, SLURM_ARRAY_TASK_ID=task))
        assert r.returncode == 0, r.stderr
    r = subprocess.run(["bash", str(ROOT / "slurm" / "merge_shards.sbatch")], capture_output=True, text=True,
                       check=False, env=dict(os.environ, **env))
    assert r.returncode == 0, r.stderr
    ref_info = json.loads((ref_out / "_info.json").read_text())
    assert json.loads((out / "_info.json").read_text())["splits"] == ref_info["splits"]
    for t in ref_info["splits"]["train"]["filenames"]:
        assert (out / t).read_bytes() == (ref_out / t).read_bytes()


def test_flat_val_with_label_file_uses_train_classes(tmp_path):
    src = tmp_path / "src"
    make_tree(src, specials=False, per_class=1)
    (src / "val").mkdir()
    truth = {}
    for i, wnid in enumerate(["n003", "n001", "n003", "n002"]):
        name = f"ILSVRC2012_val_{i + 1:08d}"
        (src / "val" / f"{name}.JPEG").write_bytes(jpeg_bytes(noisy_rgb(50 + i)))
        truth[f"val/{name}.JPEG"] = wnid
    (src / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n" + "".join(f"{Path(p).stem},{w} 1 2 3 4\n" for p, w in truth.items()))
    out = tmp_path / "out"
    run_prep("imagenet", src, out, "--split", "val", "--shard-size", 2, "--workers", 1, "--quiet")
    run_prep("imagenet", src, out, "--split", "train", "--shard-size", 2, "--workers", 1, "--quiet")
    got = {json.loads(s["json"])["path"]: int(s["cls"]) for s in all_samples(out, "val").values()}
    assert got == {p: ["n001", "n002", "n003"].index(w) for p, w in truth.items()}
    info = json.loads((out / "_info.json").read_text())
    assert set(info["splits"]) == {"train", "val"} and info["splits"]["val"]["num_samples"] == 4
    (src / "val" / "ILSVRC2012_val_00000099.JPEG").write_bytes(jpeg_bytes(noisy_rgb(60)))
    r = run_prep("imagenet", src, tmp_path / "o2", "--split", "val", check=False)
    assert r.returncode == 2 and "no label" in r.stderr


def test_scan_check_rejects_everything_a_full_decode_rejects():
    """Fuzz: truncations, byte changes in headers and scan data, inserted markers (reference: PIL full decode)."""
    rng = random.Random(0)
    originals = [jpeg_bytes(noisy_rgb(s, 96, 64)) for s in range(4)] + [jpeg_bytes(noisy_rgb(9, 96, 64)[..., 1])]
    for d in originals:
        assert prepare_image(d, "scan").data == d
    n_full_rejects = 0
    for t in range(400):
        d = originals[t % len(originals)]
        sos = d.find(b"\xff\xda")
        b = bytearray(d)
        kind = t % 4
        if kind == 0:
            b = b[: rng.randrange(len(b))]
        elif kind == 1:
            for _ in range(2):
                b[rng.randrange(2, sos + 12)] = rng.randrange(256)
        elif kind == 2:
            for _ in range(10):
                b[rng.randrange(sos, len(b))] = rng.randrange(256)
        else:
            i = rng.randrange(sos + 12, len(b) - 2)
            b[i:i + 2] = bytes([0xFF, rng.randrange(0xC0, 0xFF)])
        b = bytes(b)
        try:
            with Image.open(io.BytesIO(b)) as im:
                im.load()
            full_ok = True
        except Exception:  # noqa: BLE001
            full_ok = False
        n_full_rejects += not full_ok
        if not full_ok:
            assert prepare_image(b, "scan").data is None, f"case {t} (kind {kind}) accepted by scan"
    assert n_full_rejects > 100


def test_wids_index_beside_info_json_reads_with_shard_list_dataset(converted, tmp_path, monkeypatch):
    """``_wids-SPLIT.json`` (wids' shard index) lists every shard with its count; ``wids.ShardListDataset``
    reads each sample once, by index, with the bytes of the tars — in place with ``localname=lambda u: u``
    (wids' default copies every shard into its cache, ``WIDS_CACHE`` or /tmp/_wids_cache)."""
    wids = pytest.importorskip("wids")
    monkeypatch.setenv("WIDS_CACHE", str(tmp_path / "wids_cache"))
    _, meta, out, _ = converted
    index = json.loads((out / "_wids-train.json").read_text())
    info = json.loads((out / "_info.json").read_text())["splits"]["train"]
    assert index["__kind__"] == "wids-shard-index-v1" and index["wids_version"] == 1
    assert [s["url"] for s in index["shardlist"]] == info["filenames"]
    assert [s["nsamples"] for s in index["shardlist"]] == info["shard_lengths"]
    ds = wids.ShardListDataset(str(out / "_wids-train.json"), transformations=[], localname=lambda u: u)
    assert len(ds) == len(meta["good"])
    want = all_samples(out)
    got = {}
    for i in range(len(ds)):
        s = ds[i]
        got[s["__key__"]] = s
    assert set(got) == set(want)
    for k, s in want.items():
        assert int(got[k][".cls"].read()) == int(s["cls"])
    assert not (tmp_path / "wids_cache").exists()  # nothing copied


def test_split_written_under_the_given_name_for_timm_validation(tmp_path):
    """``--split val --split-name validation``: timm's ``split='validation'`` reads it; our shard specs accept
    ``#validation`` and ``#val`` for it."""
    import timm.data

    from sere_scale.data.shardlist import resolve_shards
    src = tmp_path / "src"
    make_tree(src, specials=False, per_class=2)
    os.rename(src / "train", src / "val")
    make_tree(tmp_path / "src2", specials=False, per_class=1)
    os.rename(tmp_path / "src2" / "train", src / "train")
    out = tmp_path / "out"
    run_prep("imagenet", src, out, "--split", "val", "--split-name", "validation", "--shard-size", 2, "--workers", 1,
             "--quiet")
    info = json.loads((out / "_info.json").read_text())
    n = info["splits"]["validation"]["num_samples"]
    assert set(info["splits"]) == {"validation"} and n == len(list((src / "val").rglob("*.*")))
    assert all(f.startswith("imagenet-validation-") for f in info["splits"]["validation"]["filenames"])
    assert (out / "_wids-validation.json").exists() and (out / "_report-validation.json").exists()
    ds = timm.data.create_dataset("wds/imagenet", root=str(out), split="validation", is_training=False, batch_size=1)
    assert len(list(ds)) == n
    for spec in (f"{out}#validation", f"{out}#val"):
        assert sum(resolve_shards(spec).counts) == n
