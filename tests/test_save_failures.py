"""A checkpoint save that fails under FSDP (torch.distributed.checkpoint, whose ``CheckpointException`` derives
from ``BaseException``) on a real full file system (issue 23, item 3): 2 ranks under torchrun, a tmpfs with room
for one checkpoint and a half. The run ends with exit code 1 on every rank, one message on rank 0 (what failed,
the folder, the free space) and no traceback, the ``.tmp`` folder removed and the last good checkpoint still
``latest``. The DDP case is ``tests/test_resume_checks.py: test_disk_full_on_a_small_tmpfs``."""
import subprocess

import pytest

from sere_scale.engine.checkpoint import find_latest
from tests.conftest import ROOT, digits_subset
from tests.test_engines import env, overrides, torchrun

CLI_RC = str(ROOT / "tests" / "dist" / "cli_rc.py")


@pytest.fixture(scope="module")
def data48(tmp_path_factory, digits_root):
    return digits_subset(digits_root, tmp_path_factory.mktemp("data48"), 3, 16)


def _train(run, data, rc_log, *extra, timeout=600):
    e = {**env(), "RC_LOG": str(rc_log)}
    cmd = torchrun(2, CLI_RC, "train", *overrides(run, data, "fsdp", *extra))
    return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=timeout)


def test_disk_full_under_fsdp_on_a_small_tmpfs(tmp_path, data48):
    ref = tmp_path / "ref"
    r = _train(ref, data48, tmp_path / "ref_rc", "train.max_steps=3")
    assert r.returncode == 0, r.stderr[-4000:]
    one = sum(f.stat().st_size for f in (ref / "checkpoints" / "step_00000003").rglob("*") if f.is_file())
    other = sum(f.stat().st_size for f in ref.rglob("*") if f.is_file() and "checkpoints" not in f.parts)
    mnt = tmp_path / "small"
    mnt.mkdir()
    size = int(one * 1.5 + other + 256 * 1024)
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
    if m.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {m.stderr.decode().strip()}")
    try:
        run, rc_log = mnt / "run", tmp_path / "rc"
        r = _train(run, data48, rc_log, "train.max_steps=6")
        out = r.stdout + r.stderr
        assert sorted(rc_log.read_text().split("\n")[:-1]) == ["0 1", "1 1"], out[-4000:]
        assert out.count("saving checkpoint step_00000006 to") == 1, out[-6000:]
        line = next(ln for ln in out.splitlines() if "saving checkpoint step_00000006 to" in ln)
        assert str(run / "checkpoints" / "step_00000006.tmp") in line and "free of" in line, line
        assert "step_00000003 is intact" in line, line
        # the workers print no traceback (torchrun's own report of a worker's exit code 1 follows theirs)
        workers = out.split("failed (exitcode: 1)")[0]
        assert "Traceback" not in workers, workers[-6000:]
        ck = run / "checkpoints"
        assert not list(ck.glob("*.tmp")) and (ck / "latest").read_text() == "step_00000003"
        assert find_latest(run).name == "step_00000003"
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
