"""The self-relation cross-entropy, the one operation behind both SERE losses:
``relation_cross_entropy`` dispatching to the plain, chunked (memory-bounded softmax) and Triton
implementations, with their FLOP tallies.

Imports: nothing of sere_scale (bottom layer). Imported by: losses, profiling.
"""
from __future__ import annotations

import contextlib

import torch

from sere_scale.kernels.chunked import relation_ce_rows_chunked
from sere_scale.kernels.plain import relation_ce_rows, weighted_mean

IMPLS = ("auto", "plain", "chunked", "triton")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_rows(student, teacher, student_scale, teacher_scale):
    if not triton_available():
        raise RuntimeError("impl='triton' requested but triton is not installed (pip install 'sere_scale[triton]')")
    from sere_scale.kernels.triton_relation import relation_ce_rows_triton
    return relation_ce_rows_triton(student, teacher, student_scale, teacher_scale)


def resolve_impl(student: torch.Tensor, teacher: torch.Tensor, impl: str = "auto") -> str:
    """The concrete implementation ``impl`` stands for on these inputs."""
    if impl != "auto":
        return impl
    supported = (torch.float32, torch.float16, torch.bfloat16)
    if (student.is_cuda and teacher.is_cuda and student.dtype in supported and teacher.dtype in supported
            and student.numel() > 0 and teacher.shape[2] > 0 and triton_available()):
        return "triton"
    return "chunked"


_TALLIES: list = []


@contextlib.contextmanager
def tally_kernel_flops():
    """Yields a one-element list that sums the FLOPs of the Triton relation kernels run inside the block.

    ``torch.utils.flop_counter`` sees aten operations only, so it counts the ``plain`` and ``chunked`` products but
    not the fused kernels; FLOP counters (``profiling.flops.count_flops``, the training loop's MFU) add this sum.
    The kernels report the model FLOPs of the plain implementation (both Gram matrices forward, the two products of
    the student gradient backward), not the Gram tiles they recompute."""
    box = [0]
    _TALLIES.append(box)
    try:
        yield box
    finally:
        _TALLIES.remove(box)


def add_kernel_flops(n: int) -> None:
    for box in _TALLIES:
        box[0] += int(n)


_ROWS = {"plain": relation_ce_rows, "chunked": relation_ce_rows_chunked, "triton": _triton_rows}


def relation_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, student_scale: float,
                           teacher_scale: float, weights: torch.Tensor | None = None,
                           impl: str = "auto") -> torch.Tensor:
    if student.dim() != 3 or teacher.dim() != 3:
        raise ValueError(f"relation_cross_entropy expects (G, R, D) inputs, got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(f"student and teacher must agree on (G, R): {tuple(student.shape[:2])} vs "
                         f"{tuple(teacher.shape[:2])}")
    if weights is not None and weights.shape != (student.shape[0],):
        raise ValueError(f"weights must have shape (G,) = ({student.shape[0]},), got {tuple(weights.shape)}")
    if impl not in IMPLS:
        raise ValueError(f"unknown relation impl '{impl}', expected one of {IMPLS}")
    rows = _ROWS[resolve_impl(student, teacher, impl)]
    return weighted_mean(rows(student, teacher, student_scale, teacher_scale), weights)


__all__ = ["IMPLS", "add_kernel_flops", "relation_cross_entropy", "resolve_impl", "tally_kernel_flops",
           "triton_available"]
