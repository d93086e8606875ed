"""Resume: changes that would break an exact continuation are refused by name (the folder untouched); a corrupt
newest checkpoint falls back to the previous one; a failed save names the path and the free space."""
import errno
import io
import json
import shutil
import subprocess
import tarfile

import pytest
import torch

from sere_scale.engine.checkpoint import CheckpointSaveError, find_latest
from sere_scale.config.load import ConfigError
from sere_scale.run.metrics import read_metrics
from sere_scale.run.train import train
from tests.conftest import digits_subset
from tests.test_run_dir import snapshot
from tests.tiny import tiny_config


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, digits_root):
    return digits_subset(digits_root, tmp_path_factory.mktemp("small"), 3, 12)


@pytest.fixture(scope="module")
def done_run(tmp_path_factory, small_data):
    """A finished 6-step run (checkpoints at steps 3 and 6), copied by each test that changes it."""
    run = tmp_path_factory.mktemp("done") / "run"
    train(tiny_config(run, small_data, "train.max_steps=6"))
    return run


@pytest.mark.parametrize("change, key", [
    (["data.batch_size=4"], "'data.batch_size'"),
    (["train.grad_accum=2", "data.batch_size=4"], "'data.batch_size'"),
    (["train.grad_accum=2"], "'train.grad_accum'"),
    (["engine.backend=fsdp"], "'engine.backend'.*engine.backend=ddp"),
    (["image_loss.out_dim=32"], "'image_loss.out_dim'"),
])
def test_a_resume_that_changes_what_exactness_needs_is_refused_by_name(tmp_path, done_run, small_data, change, key):
    run = tmp_path / "run"
    shutil.copytree(done_run, run)
    before = snapshot(run)
    with pytest.raises(ConfigError, match=key):
        train(tiny_config(run, small_data, "train.max_steps=8", *change), resume=True)
    assert snapshot(run) == before


def test_another_world_size_under_ddp_is_refused(tmp_path, done_run, small_data):
    run = tmp_path / "run"
    shutil.copytree(done_run, run)
    meta = run / "checkpoints" / "step_00000006" / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "world_size": 2}))  # as if written by 2 ranks
    before = snapshot(run)
    with pytest.raises(ConfigError, match="2 ranks, this launch has 1.*engine.backend=fsdp reshards"):
        train(tiny_config(run, small_data, "train.max_steps=8"), resume=True)
    assert snapshot(run) == before


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, done_run, small_data, caplog):
    run = tmp_path / "run"
    shutil.copytree(done_run, run)
    newest = run / "checkpoints" / "step_00000006" / "model.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with caplog.at_level("WARNING"):
        out = train(tiny_config(run, small_data, "train.max_steps=6"), resume=True)
    assert out["step"] == 6
    assert any("step_00000006 is corrupt" in r.message and "falling back" in r.message for r in caplog.records)
    assert (run / "checkpoints" / "step_00000006.corrupt").is_dir()  # set aside, never loaded or pruned again
    assert find_latest(run).name == "step_00000006"  # written again by the resumed run
    a, b = read_metrics(done_run), read_metrics(run)
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):  # steps 4-6 trained again from step 3: the same curve
        for k in ("loss", "loss_image", "loss_spatial", "loss_channel", "grad_norm"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-6, abs=1e-7), (ra["step"], k)


def _shards(root, data):
    """4 tar shards of 9 samples from an image folder, listed in shards.txt."""
    files = sorted(f for d in sorted(data.iterdir()) for f in sorted(d.iterdir()))
    lines = []
    for s in range(4):
        with tarfile.open(root / f"part-{s}.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
            for j, f in enumerate(files[9 * s: 9 * s + 9]):
                for ext, blob in (("png", f.read_bytes()), ("cls", str(s % 3).encode())):
                    ti = tarfile.TarInfo(f"s{s}_{j:03d}.{ext}")
                    ti.size = len(blob)
                    tf.addfile(ti, io.BytesIO(blob))
        lines.append(f"part-{s}.tar 9\n")
    (root / "shards.txt").write_text("".join(lines))
    return root / "shards.txt"


def test_a_resume_with_other_shard_workers_is_refused(tmp_path, small_data):
    spec = _shards(tmp_path, small_data)
    extra = ["data.path=", f"data.shards={spec}", "data.batch_size=4", "train.max_steps=3"]
    run = tmp_path / "run"
    train(tiny_config(run, "", *extra))
    before = snapshot(run)
    with pytest.raises(ConfigError, match="'data.num_workers'.*data.num_workers=0 or 1"):
        train(tiny_config(run, "", *extra, "data.num_workers=2", "train.max_steps=4"), resume=True)
    assert snapshot(run) == before
    assert train(tiny_config(run, "", *extra, "train.max_steps=4"), resume=True)["step"] == 4  # unchanged: fine


def _check_failed_save(run, err, step_ok):
    msg = str(err)
    assert f"step_{step_ok + 3:08d}.tmp" in msg and "free of" in msg, msg
    assert f"step_{step_ok:08d}" in msg, msg  # names the last good checkpoint
    ck = run / "checkpoints"
    assert not list(ck.glob("*.tmp")) and (ck / "latest").read_text() == f"step_{step_ok:08d}"
    sd = torch.load(ck / f"step_{step_ok:08d}" / "model.pt", weights_only=False)
    assert sd["train_state"]["step"] == step_ok


def test_a_failed_save_names_the_path_and_the_space_and_keeps_the_last_checkpoint(tmp_path, small_data,
                                                                                   monkeypatch):
    """Simulated disk full: the second checkpoint's model.pt is written half, then ENOSPC."""
    orig, calls = torch.save, {"n": 0}

    def save(obj, f, *a, **k):
        if str(f).endswith("model.pt"):
            calls["n"] += 1
            if calls["n"] == 2:
                buf = io.BytesIO()
                orig(obj, buf)
                with open(f, "wb") as out:
                    out.write(buf.getvalue()[:1000])
                raise OSError(errno.ENOSPC, "No space left on device")
        return orig(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", save)
    run = tmp_path / "run"
    with pytest.raises(CheckpointSaveError, match="No space left on device") as e:
        train(tiny_config(run, small_data, "train.max_steps=6"))
    _check_failed_save(run, e.value, 3)
    monkeypatch.setattr(torch, "save", orig)
    assert train(tiny_config(run, small_data, "train.max_steps=6"), resume=True)["step"] == 6


def test_disk_full_on_a_small_tmpfs(tmp_path, small_data):
    """A real full file system: a tmpfs with room for one checkpoint and a half (root only)."""
    ref = tmp_path / "ref"
    train(tiny_config(ref, small_data, "train.max_steps=3"))
    one = sum(f.stat().st_size for f in (ref / "checkpoints" / "step_00000003").rglob("*") if f.is_file())
    other = sum(f.stat().st_size for f in ref.rglob("*") if f.is_file() and "checkpoints" not in f.parts)
    mnt = tmp_path / "small"
    mnt.mkdir()
    size = int(one * 1.5 + other + 256 * 1024)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.decode().strip()}")
    try:
        run = mnt / "run"
        with pytest.raises(CheckpointSaveError, match="No space left on device|unexpected pos") as e:
            train(tiny_config(run, small_data, "train.max_steps=6"))
        _check_failed_save(run, e.value, 3)
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
