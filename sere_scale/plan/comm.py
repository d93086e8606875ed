"""Collectives of one step, counted as they are dispatched (``c10d`` and ``_c10d_functional`` ops: DDP's reducer,
FSDP2's all-gathers and reduce-scatters, the centers', SyncBN's and MoCo's collectives, the step's vote), and
their predicted time on given links.

Bytes per rank and call, by collective type: all-reduce and broadcast — the tensor; all-gather — the gathered
(output) tensor; reduce-scatter — the unreduced (input) tensor. Works on fake tensors (the plan's trace under
a fake process group) and on real ones (a real gloo run), so the two counts are comparable.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

TYPES = ("all_gather", "reduce_scatter", "all_reduce", "broadcast")

# op name (without namespace and overload) → collective type
_OPS = {
    "allreduce_": "all_reduce", "allreduce_coalesced_": "all_reduce", "all_reduce": "all_reduce",
    "all_reduce_": "all_reduce", "all_reduce_coalesced": "all_reduce", "all_reduce_coalesced_": "all_reduce",
    "allgather_": "all_gather", "_allgather_base_": "all_gather", "allgather_into_tensor_coalesced_": "all_gather",
    "allgather_coalesced_": "all_gather", "all_gather_into_tensor": "all_gather",
    "all_gather_into_tensor_out": "all_gather", "all_gather_into_tensor_coalesced": "all_gather",
    "reduce_scatter_": "reduce_scatter", "_reduce_scatter_base_": "reduce_scatter",
    "reduce_scatter_tensor_coalesced_": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "broadcast_": "broadcast", "broadcast": "broadcast",
}


@dataclass(frozen=True)
class Collective:
    kind: str          # one of TYPES
    nbytes: int        # bytes per rank (see the module docstring)
    group: tuple       # global ranks of the group (sorted)


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(v) for v in x)
    return 0


def _group_ranks(args, kwargs) -> tuple:
    """Global ranks of the collective's process group (a ``ProcessGroup`` for ``c10d`` ops, a group name for the
    functional ones)."""
    for a in [*args, *kwargs.values()]:
        pg = None
        if isinstance(a, dist.ProcessGroup):
            pg = a
        elif isinstance(a, str):
            try:
                pg = dist.distributed_c10d._resolve_process_group(a)
            except (ValueError, RuntimeError, KeyError):
                pg = None
        if pg is not None:
            return tuple(sorted(dist.get_process_group_ranks(pg)))
    return tuple(range(dist.get_world_size()))


def _bytes_of(kind: str, name: str, args) -> int:
    if kind == "all_gather":
        return _nbytes(args[0])  # output tensor(s) first in the c10d ops; the functional op: input × group
    if kind == "reduce_scatter" and name in ("reduce_scatter_", ):
        return _nbytes(args[1])  # (outputs, input lists)
    if kind == "reduce_scatter" and name in ("_reduce_scatter_base_", "reduce_scatter_tensor_coalesced_"):
        return _nbytes(args[1])  # (output, input)
    return _nbytes(args[0])


class CollectiveCounter(TorchDispatchMode):
    """Records every collective dispatched inside it (``calls``: a list of ``Collective``)."""

    def __init__(self):
        super().__init__()
        self.calls: list[Collective] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ns = func.namespace
        name = func.__name__.split(".")[0]
        if ns in ("c10d", "_c10d_functional") and name in _OPS:
            kind = _OPS[name]
            group = _group_ranks(args, kwargs)
            nbytes = _bytes_of(kind, name, args)
            if ns == "_c10d_functional" and kind == "all_gather":
                nbytes *= len(group)
            self.calls.append(Collective(kind, nbytes, group))
        return func(*args, **kwargs)

    def bytes_by_type(self) -> dict:
        return bytes_by_type(self.calls)


def bytes_by_type(calls) -> dict:
    out = dict.fromkeys(TYPES, 0)
    for c in calls:
        out[c.kind] += c.nbytes
    return out


def counts_by_type(calls) -> dict:
    out = defaultdict(int)
    for c in calls:
        out[c.kind] += 1
    return {k: out[k] for k in TYPES}
