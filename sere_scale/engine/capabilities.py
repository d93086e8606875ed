"""What this machine can run, probed in one place: the engines' checks and the tests' skips use these.

Each probe returns ``None`` when the capability is there, else a one-line reason (shown as the config error or
as the test's skip reason). Machines differ: DeepSpeed's CPU accelerator accepts fp16 only where oneDNN has fp16
kernels (``torch.ops.mkldnn._is_mkldnn_fp16_supported()``: AVX-512 FP16 / AMX-FP16 CPUs), so an AMD EPYC or an
older Xeon refuses it; ``torch.compile``'s default backend (inductor) builds its CPU kernels with a C++ compiler.
"""
from __future__ import annotations

import os
import shutil
import sysconfig

_DS_DTYPES = {"fp16": "is_fp16_supported", "bf16": "is_bf16_supported"}


def deepspeed_precision_problem(precision: str, accelerator: str | None = None) -> str | None:
    """Why DeepSpeed's accelerator cannot train in ``precision``, or ``None``. ``accelerator``: ``"cpu"`` asks
    DeepSpeed's CPU accelerator (what ``DS_ACCELERATOR=cpu`` selects) without selecting it for this process;
    ``None``, the one DeepSpeed selected (``get_accelerator()``)."""
    probe = _DS_DTYPES.get(precision)
    if probe is None:  # fp32
        return None
    try:
        if accelerator == "cpu":
            from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator
            acc = CPU_Accelerator()
        else:
            from deepspeed.accelerator import get_accelerator
            acc = get_accelerator()
    except ImportError as e:
        return f"deepspeed is not importable ({e})"
    if getattr(acc, probe)():
        return None
    why = ""
    if acc.device_name() == "cpu" and precision == "fp16":
        why = " (the CPU lacks oneDNN fp16 kernels: torch.ops.mkldnn._is_mkldnn_fp16_supported() is False)"
    return f"DeepSpeed's {acc.device_name()} accelerator does not support {precision} on this machine{why}"


def cxx_compiler() -> str | None:
    """The C++ compiler inductor would use (``$CXX``, else g++ / clang++ / c++ on PATH), or ``None``."""
    for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def inductor_cpu_problem() -> str | None:
    """Why ``torch.compile`` (inductor) cannot build CPU kernels here, or ``None``."""
    if cxx_compiler() is None:
        return "torch.compile's inductor backend needs a C++ compiler on CPU: none found ($CXX, g++, clang++, c++)"
    include = sysconfig.get_paths().get("include") or ""
    if not os.path.exists(os.path.join(include, "Python.h")):
        return f"torch.compile's inductor backend needs the Python headers (Python.h not in '{include}')"
    return None
