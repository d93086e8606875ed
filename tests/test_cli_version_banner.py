"""``sere-scale --version`` prints the project's version; the start-up banner is logged before the progress bar
starts (on lines of its own, not on the bar's line)."""
import io
import logging
import subprocess
import sys
import tomllib
from pathlib import Path

from sere_scale.run.train import train
from tests.conftest import digits_subset, subprocess_env
from tests.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_the_projects():
    want = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    r = subprocess.run([sys.executable, "-m", "sere_scale", "--version"], capture_output=True, text=True,
                       env=subprocess_env(), timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"sere-scale {want}"


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_banner_comes_before_the_progress_bar(tmp_path, digits_root, monkeypatch):
    data = digits_subset(digits_root, tmp_path / "data", 2, 8)
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    handler = logging.StreamHandler(term)
    logger = logging.getLogger("sere_scale")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        train(tiny_config(tmp_path / "run", data, "train.max_steps=2", "data.batch_size=4", "train.progress=true"))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    text = term.getvalue()
    banner, bar = text.find("sere_scale training run"), text.find("train:")
    assert 0 <= banner < bar, text[:2000]
    end = text.find("\n", text.find("  resume ", banner))
    assert end < bar  # the bar starts after the banner's last line ends
