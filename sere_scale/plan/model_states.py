"""Model states a rank holds: its pieces of the student and teacher parameters, buffers, gradients and optimizer
states (local shards for FSDP2 DTensors), counted from the engine's own tensors; and DeepSpeed's model states
(a DeepSpeed engine cannot be built under a fake process group) computed by DeepSpeed's own partitioning rules
from the layout of the model (``ZeroLayout``: its param groups, what a traced forward runs)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def nbytes(t: torch.Tensor) -> int:
    t = _local(t)
    return t.numel() * t.element_size()


def held_bytes(engine, method) -> dict:
    """Bytes of the tensors a DDP/FSDP engine's rank holds between steps, by kind; ``gradients``: the gradients
    the optimizer steps on (one per trainable parameter, shaped like the rank's piece of it)."""
    opt = engine.optimizer
    trainable = [p for g in opt.param_groups for p in g["params"]]
    states = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    return {
        "student_params": sum(nbytes(p) for p in engine.student_module.parameters()),
        "teacher_params": sum(nbytes(p) for p in engine.teacher_module.parameters()),
        "buffers": sum(nbytes(b) for m in (engine.student_module, engine.teacher_module, method)
                       for b in m.buffers()),
        "gradients": sum(nbytes(p) for p in trainable),
        "optimizer": sum(nbytes(s) for s in states),
    }


def param_counts(student, teacher) -> dict:
    """Element counts of a (full, unsharded) student and teacher: total, trainable."""
    return {"student": sum(p.numel() for p in student.parameters()),
            "trainable": sum(p.numel() for p in student.parameters() if p.requires_grad),
            "teacher": sum(p.numel() for p in teacher.parameters())}


@dataclass
class ZeroLayout:
    """What DeepSpeed's partitioning depends on, element counts of the full model: the trainable student
    parameters of each of our AdamW's param groups (``engine.params.param_groups``, DeepSpeed's flat groups, in
    order), the frozen student parameters, and the student's and teacher's parameters, all of them and those
    ZeRO-3 gathers in a forward (of a module that runs, or whose descendant runs: ``called_modules``)."""
    groups: list
    frozen: list
    student: list
    student_used: list
    teacher: list
    teacher_used: list


@contextlib.contextmanager
def called_modules():
    """Every ``nn.Module`` whose forward runs inside the block (a global forward pre-hook): a list of modules."""
    seen: dict = {}

    def note(module, args):  # returns None: the inputs stay as they are
        seen.setdefault(id(module), module)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(note)
    out: list = []
    try:
        yield out
    finally:
        handle.remove()
        out.extend(seen.values())


def _used(root, called_ids: set) -> list:
    """Numels of ``root``'s parameters whose module, or a descendant of it, ran (what ZeRO-3's module hooks
    gather: a module's own parameters when it runs, its parents' when their forward runs around it)."""
    out = []
    for m in root.modules():
        if any(id(d) in called_ids for d in m.modules()):
            out += [p.numel() for p in m.parameters(recurse=False)]
    return out


def zero_layout(called: list) -> ZeroLayout:
    """The layout from the modules a traced step ran (``called_modules`` around ``trace_step``): the student
    is the outermost module that ran with trainable parameters, the teacher the one whose parameters are all
    frozen (``models.network.build_student_teacher``)."""
    from sere_scale.engine.params import param_groups
    ids = {id(m) for m in called}
    inner = {id(d) for m in called for d in m.modules() if d is not m}
    roots = [m for m in called if id(m) not in inner and any(True for _ in m.parameters())]
    students = [m for m in roots if any(p.requires_grad for p in m.parameters())]
    teachers = [m for m in roots if not any(p.requires_grad for p in m.parameters())]
    if len(students) != 1 or len(teachers) != 1:
        raise RuntimeError(f"plan: the traced step ran {len(students)} student-like and {len(teachers)} "
                           f"teacher-like top modules (expected one of each)")
    student, teacher = students[0], teachers[0]
    groups = [[p.numel() for p in g["params"] if p.requires_grad]
              for g in param_groups(student, split_last_layer=True)]
    return ZeroLayout([g for g in groups if g], [p.numel() for p in student.parameters() if not p.requires_grad],
                      [p.numel() for p in student.parameters()], _used(student, ids),
                      [p.numel() for p in teacher.parameters()], _used(teacher, ids))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def zero12_partitions(layout: ZeroLayout, world: int) -> list:
    """ZeRO-1/2: each param group flattened and padded to a multiple of 2 × world elements
    (``nccl_start_alignment_factor`` × world), then cut into ``world`` equal partitions: elements per rank and
    group."""
    return [ceil_div(sum(g), 2 * world) * 2 for g in layout.groups]


def zero3_partition(numels, world: int) -> int:
    """ZeRO-3: every parameter padded to a multiple of ``world`` and cut into equal partitions: elements per rank."""
    return sum(ceil_div(n, world) for n in numels)


def deepspeed_model_states(stage: int, layout: ZeroLayout, world: int, lowp_bytes: int, comm_bytes: int,
                           reduce_bucket: int) -> dict:
    """Per-rank bytes our DeepSpeed engine holds at its optimizer step, by DeepSpeed's own partitioning rules
    (stage_1_and_2.py, stage3.py, partition_parameters.py of deepspeed 0.19); ``lowp_bytes``: the element size
    of the compute parameters (2 for bf16/fp16, 4 for fp32), ``comm_bytes``: of ``communication_data_type``.

    * ZeRO-1/2: the full low-precision student (its flat, padded group buffers), fp32 master partitions, AdamW's
      two fp32 moments per partition and one fp32 step count per group, the fp32 gradient partition of one group
      at a time during the step (``step_gradients``), the full fp32 EMA teacher.
    * ZeRO-3: low-precision student partitions, fp32 master partitions, AdamW as above, the low-precision
      gradient partitions, one fp32 gradient partition per group during the step, the reduce bucket
      (``reduce_bucket_size`` elements of the communication dtype, kept), and the teacher's low-precision
      partitions plus the fp32 partitions the EMA updates (``engine/deepspeed.py``).
    """
    if stage in (1, 2):
        parts = zero12_partitions(layout, world)
        return {"student_params": lowp_bytes * (world * sum(parts) + sum(layout.frozen)),
                "fp32_masters": 4 * sum(parts),
                "optimizer": sum(2 * 4 * n + 4 for n in parts),
                "step_gradients": 4 * max(parts, default=0),
                "gradients": 0, "reduce_buckets": 0,
                "teacher_params": 4 * sum(layout.teacher)}
    if stage == 3:
        parts = [zero3_partition(g, world) for g in layout.groups]
        teacher = zero3_partition(layout.teacher, world)
        return {"student_params": lowp_bytes * zero3_partition(layout.student, world),
                "fp32_masters": 4 * sum(parts),
                "optimizer": sum(2 * 4 * n + 4 for n in parts),
                "step_gradients": 4 * max(parts, default=0),
                "gradients": lowp_bytes * sum(parts),
                "reduce_buckets": comm_bytes * reduce_bucket,
                "teacher_params": lowp_bytes * teacher + (4 * teacher if lowp_bytes != 4 else 0)}
    raise ValueError(f"config key 'engine.zero_stage': {stage} is not 1, 2 or 3")
