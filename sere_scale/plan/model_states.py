"""Model states a rank holds: its pieces of the student and teacher parameters, buffers, gradients and optimizer
states (local shards for FSDP2 DTensors), counted from the engine's own tensors; and DeepSpeed's analytic model
states from DeepSpeed's own estimators (a DeepSpeed engine cannot be built under a fake process group)."""
from __future__ import annotations

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
    """Element counts of a (full, unsharded) student and teacher: total, trainable, the largest module's own
    parameters (ZeRO-3 gathers one module at a time)."""
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in student.modules())
    return {"student": sum(p.numel() for p in student.parameters()),
            "trainable": sum(p.numel() for p in student.parameters() if p.requires_grad),
            "teacher": sum(p.numel() for p in teacher.parameters()),
            "largest_layer": largest}


def deepspeed_model_states(stage: int, counts: dict, world: int, gpus_per_node: int) -> dict:
    """Per-rank model-state bytes of our DeepSpeed engine (bf16 compute, fp32 masters and AdamW), from
    DeepSpeed's estimators (``estimate_zero2_model_states_mem_needs`` for stages 1 and 2,
    ``estimate_zero3_model_states_mem_needs`` for 3, no offload) for the student, plus the EMA teacher:
    a full fp32 module on every rank under ZeRO-1/2, partitioned like the student under ZeRO-3 (fp32)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    nodes = max(world // gpus_per_node, 1)
    gpn = min(world, gpus_per_node)
    if stage in (1, 2):
        _, student = estimate_zero2_model_states_mem_needs(counts["student"], gpn, nodes, cpu_offload=False)
        teacher = 4 * counts["teacher"]
    elif stage == 3:
        _, student, _ = estimate_zero3_model_states_mem_needs(counts["student"], counts["largest_layer"], gpn, nodes,
                                                              cpu_offload=False, cpu_offload_params=False)
        teacher = -(-4 * counts["teacher"] // world)
    else:
        raise ValueError(f"config key 'engine.zero_stage': {stage} is not 1, 2 or 3")
    return {"student_states": int(student), "teacher_params": int(teacher)}
