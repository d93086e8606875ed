"""The tests' side of ``sere_scale/engine/capabilities.py``: skip (with the reason) only the cases that need a
capability this machine lacks. Probes are cached: each runs once per test session, when the first case asks."""
import functools

import pytest

from sere_scale.engine.capabilities import deepspeed_precision_problem, inductor_cpu_problem


@functools.cache
def ds_cpu_problem(precision: str):
    """Why DeepSpeed's CPU accelerator (the one the tests' launches select) refuses ``precision``, or None."""
    return deepspeed_precision_problem(precision, "cpu")


@functools.cache
def inductor_problem():
    return inductor_cpu_problem()


def require_ds_cpu(precision: str) -> None:
    reason = ds_cpu_problem(precision)
    if reason:
        pytest.skip(f"needs {precision} in DeepSpeed's CPU accelerator: {reason}")


def require_inductor() -> None:
    reason = inductor_problem()
    if reason:
        pytest.skip(f"needs torch.compile on CPU: {reason}")
