"""One real ``train_step`` (``sere_scale.step``) traced for N simulated ranks in one CPU process.

The recipe (docs/FINDINGS.md, torchtitan's estimation): torch's fake process group (``FakeStore``, backend
``"fake"``: every collective returns at once, moving nothing) at world size N; the student, teacher and method
built on the meta device (``startup.build_model``), then the project's own engine (``engine.build_engine``) and a
synthetic batch of the real format under ``FakeTensorMode`` (shapes and dtypes only, no memory, no arithmetic);
one step under ``MemTracker`` (live bytes: peak), ``CollectiveCounter`` (bytes per collective) and the
profiler's FLOP counter. Two things cannot run on fake tensors and are handled here, in the open:

* the step's vote reads its all-reduced flags on the host (``tolist``): the all-reduce is traced; the reading
  is answered "every rank finite, none preempted";
* the device mesh cannot be made under fake mode: FSDP's ``build_mesh`` runs with fake mode suspended;
* FSDP2 shards a parameter by splitting it into N views (``_fsdp_param._chunk_with_empty``) and keeping one: at
  N = 512 that is ~10⁵ fake tensors for a ViT-B, most of an FSDP trace's time. ``_Chunks`` makes only the
  views FSDP reads (its rank's, and the first, padded one), each the same ``narrow`` view ``torch.chunk``
  makes, so shapes, strides and storages are unchanged;
* the traced step runs on the CPU, where the chunked relation kernel would use its CPU block (2**22 elements);
  it is traced with its CUDA block (``DEFAULT_BLOCK_ELEMS_CUDA``), as on a GPU without Triton (with Triton the
  fused kernel keeps less), which also cuts the trace's operator count by up to 16.

DDP: torch's DDP reducer (C++) cannot hold fake tensors, so the DDP engine is built unwrapped (one-rank
engine) inside the N-rank fake world — every collective of the method and the step is traced — and DDP's own
gradient all-reduce (one per trainable parameter's gradient, in buckets) and its bucket buffers (one more copy of
the gradients) are added from the traced parameters. DeepSpeed cannot be built under a fake group at all: see
``model_states.deepspeed_model_states`` and ``estimate``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from sere_scale.plan.comm import Collective, CollectiveCounter

from sere_scale.run import step as step_module


@dataclass
class Trace:
    backend: str
    strategy: str
    world: int
    held: dict                       # bytes a rank holds between steps, by kind (model_states.held_bytes)
    static_bytes: int                # live bytes at the step's start (MemTracker)
    peak_bytes: int                  # live bytes at the step's peak (MemTracker)
    calls: list = field(default_factory=list)  # Collective per call
    flops: int = 0                   # FLOPs of the step on this rank (forward + backward, all micro-batches)
    counts: dict = field(default_factory=dict)  # param_counts of the full model
    notes: list = field(default_factory=list)
    n_traced: int = 0                # calls[:n_traced] were traced; the rest added (DDP's reducer)

    @property
    def model_states_bytes(self) -> int:
        return sum(self.held.values())

    @property
    def activations_bytes(self) -> int:
        """Peak live bytes over the step beyond the model states: activations kept for backward, temporaries,
        FSDP's gathered parameters, DDP's buckets."""
        return max(self.peak_bytes - self.model_states_bytes, 0)


class _PeakTracker:
    """``MemTracker`` reduced to what the plan reads, the live bytes of every storage and their global peak: no
    per-module statistics (torch's installs gradient hooks that modules with frozen parameters refuse, walks
    every module's statistics after every operator — most of a trace's time — and refuses a module called again
    after a backward, as gradient accumulation does)."""

    def __new__(cls):
        from torch.distributed._tools.mem_tracker import MemTracker

        class Tracker(MemTracker):
            def _pre_fw_hook(self, module, inputs) -> None:
                pass

            def _post_fw_hook(self, module, inputs, outputs) -> None:
                pass

            def _pre_bw_hook(self, module, args) -> None:
                pass

            def _post_bw_hook(self, module, args) -> None:
                pass

            def _update_peak_stats(self, peak_state) -> None:
                for dev, snap in self._curr_mem_snap.items():
                    if self._peak_mem.get(dev, 0) < snap["Total"]:
                        self._peak_mem[dev] = snap["Total"]
                        self._peak_mem_snap[dev] = dict(snap)
        return Tracker()


def _total(snapshot: dict) -> int:
    return sum(d["Total"] for d in snapshot.values())


@contextlib.contextmanager
def fake_world(world: int):
    """A fake process group of ``world`` ranks (this process is rank 0) for the duration of the block."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized():
        raise RuntimeError("plan: a process group already exists in this process; trace in a fresh process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _traceable():
    """The adaptations of the module docstring, undone on exit."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, unset_fake_temporarily

    from torch.distributed.fsdp._fully_shard import _fsdp_param

    from sere_scale.engine import fsdp
    from sere_scale.kernels import chunked
    real_mesh, real_vote, cpu_block = fsdp.build_mesh, step_module._vote, chunked.DEFAULT_BLOCK_ELEMS
    real_chunks = _fsdp_param._chunk_with_empty

    def build_mesh(*args, **kwargs):
        with unset_fake_temporarily():
            return real_mesh(*args, **kwargs)

    def vote(ok, preempt, world_size, grad_ok=None):
        with contextlib.suppress(DataDependentOutputException):  # the all-reduce is traced; its host read is not
            real_vote(ok, preempt, world_size, grad_ok)
        return True, True, False  # (losses finite, gradient norm finite, preempted): as run/step.py:_vote

    fsdp.build_mesh, step_module._vote = build_mesh, vote
    chunked.DEFAULT_BLOCK_ELEMS = chunked.DEFAULT_BLOCK_ELEMS_CUDA
    _fsdp_param._chunk_with_empty = _Chunks
    try:
        yield
    finally:
        fsdp.build_mesh, step_module._vote = real_mesh, real_vote
        chunked.DEFAULT_BLOCK_ELEMS = cpu_block
        _fsdp_param._chunk_with_empty = real_chunks


class _Chunks(Sequence):
    """``torch.distributed.fsdp._fully_shard._fsdp_common._chunk_with_empty(tensor, n, dim)`` made lazily: chunk
    ``i`` of ``torch.chunk`` (``narrow`` at ``i·⌈d/n⌉``, length up to ``⌈d/n⌉``), an empty 1-D tensor past the
    last chunk ``torch.chunk`` returns, built only when read (module docstring)."""

    def __init__(self, tensor: torch.Tensor, num_chunks: int, dim: int):
        self.tensor, self.n, self.dim = tensor, num_chunks, dim
        d = tensor.size(dim)
        self.step = -(-d // num_chunks)
        self.full = -(-d // self.step) if d else num_chunks   # chunks torch.chunk returns (n empty ones if d = 0)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.n:
            raise IndexError(i)
        if i < self.full:
            d = self.tensor.size(self.dim)
            return self.tensor.narrow(self.dim, i * self.step, min(self.step, d - i * self.step))
        return self[0].new_empty(0)


def ddp_gradient_allreduce(engine, world: int) -> list:
    """DDP's gradient all-reduce, one bucketed pass over every trainable parameter's gradient (fp32: the
    parameters' dtype), as one ``Collective`` per bucket of at most ``bucket_cap_mb`` (25 MiB; the first
    bucket 1 MiB, torch's default)."""
    from sere_scale.plan.model_states import nbytes
    sizes = [nbytes(p) for p in engine.student_module.parameters() if p.requires_grad]
    total = sum(sizes)
    group = tuple(range(world))
    caps, out, left = [1 << 20], [], total
    while left > 0:
        cap = caps.pop(0) if caps else 25 << 20
        out.append(Collective("all_reduce", min(cap, left), group))
        left -= min(cap, left)
    return out


def trace_step(cfg, world: int) -> Trace:
    """Trace one training step of ``cfg`` (backend ``cfg.engine.backend``: ddp or fsdp) at ``world`` ranks."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sere_scale.data.synthetic import SyntheticLoader
    from sere_scale.engine.distributed import DistInfo
    from sere_scale.engine import build_engine
    from sere_scale.engine.fsdp import init_adamw_state
    from sere_scale.models.backbone import patch_size_of
    from sere_scale.profiling.flops import counting_flops
    from sere_scale.method.schedules import build_schedules
    from sere_scale.run.startup import build_model
    from sere_scale.plan.model_states import held_bytes, param_counts
    backend = cfg.engine.backend
    if backend not in ("ddp", "fsdp"):
        raise ValueError(f"config key 'engine.backend': '{backend}' cannot be traced (ddp, fsdp)")
    strategy = cfg.engine.fsdp_strategy if backend == "fsdp" else "replicate"
    notes = []
    with fake_world(world), _traceable():
        with torch.device("meta"):
            student, teacher, method = build_model(cfg)
        counts = param_counts(student, teacher)
        # DDP: the one-rank engine (no reducer) inside the N-rank world (module docstring)
        info = DistInfo(0, 1 if backend == "ddp" else world, 0, torch.device("cpu"))
        with FakeTensorMode(allow_non_fake_inputs=True):
            engine = build_engine(cfg, student, teacher, method, info)
            init_adamw_state(engine.optimizer)  # the steady state: AdamW's moments exist before the step
            loader = SyntheticLoader(cfg, patch_size_of(cfg.model), n_distinct=1)
            batches = step_module.Batches(loader, {"epoch": 0, "batch": 0}, info.device)
            sched = build_schedules(cfg, 1000, world).at(1000)
            tracker, counter = _PeakTracker(), CollectiveCounter()
            tracker.track_external(engine.optimizer, *_held_tensors(engine, method))
            static = _total(tracker.get_tracker_snapshot("current"))
            with tracker, counter, counting_flops() as flops:
                step_module.train_step(engine, method, batches, sched, cfg.train.grad_accum, world,
                                       freeze_last_layer=False)
            peak = _total(tracker.get_tracker_snapshot("peak"))
            held = held_bytes(engine, method)
            calls = list(counter.calls)
            n_traced = len(calls)
            if backend == "ddp" and world > 1:
                calls += ddp_gradient_allreduce(engine, world)
                held["ddp_buckets"] = held["gradients"]
                peak += held["gradients"]
                notes.append("DDP gradient all-reduce and buckets added from the traced parameters")
    return Trace(backend, strategy, world, held, static, peak, calls, flops[0], counts, notes, n_traced)


def _held_tensors(engine, method) -> list:
    mods = (engine.student_module, engine.teacher_module, method)
    return [t for m in mods for t in (*m.parameters(), *m.buffers())]
