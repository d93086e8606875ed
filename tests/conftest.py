import os
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


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    from sere_scale.data.demo_data import write_digits
    return write_digits(tmp_path_factory.mktemp("digits"), size=32)


@pytest.fixture
def python():
    return sys.executable
