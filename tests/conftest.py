import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")


def subprocess_env(**extra) -> dict:
    """Environment for child processes: this checkout first on the path, one thread per process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def digits_subset(digits_root: Path, dst: Path, classes: int | None, per_class: int, split: str = "train") -> Path:
    """An image folder under ``dst`` with the first ``per_class`` digits of the first ``classes`` classes
    (all classes when None) of a split of the digits set."""
    for c in sorted((digits_root / split).iterdir())[:classes]:
        (dst / c.name).mkdir(parents=True)
        for f in sorted(c.iterdir())[:per_class]:
            shutil.copy(f, dst / c.name / f.name)
    return dst


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    from sere_scale.data.demo_data import write_digits
    return write_digits(tmp_path_factory.mktemp("digits"), size=32)


@pytest.fixture(scope="session")
def data48(tmp_path_factory, digits_root):
    """48 training digits (16 of each of the first 3 classes): the engines' and non-finite tests' small data, read
    only."""
    return digits_subset(digits_root, tmp_path_factory.mktemp("data48"), 3, 16)


@pytest.fixture
def python():
    return sys.executable
