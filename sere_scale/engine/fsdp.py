"""FSDP2 engine (``torch.distributed.fsdp.fully_shard``): one unit per transformer block, one per head, root
(the units of the network's ``parallel_plan()``).

* Strategies (``engine.fsdp_strategy``): ``full`` (shard parameters, gradients and optimizer state over all
  ranks; parameters re-sharded after forward), ``grad_op`` (the same, but parameters stay gathered from
  forward to backward: ``reshard_after_forward=False``), ``hybrid`` (HSDP: a 2-D mesh, sharded within a node
  of ``engine.fsdp_node_size`` ranks, replicated across nodes).
* Precision: bf16/fp16 compute on fp32 sharded master weights, gradients reduced in fp32
  (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``) for the backbone; the heads keep fp32
  parameters and run under autocast, as under DDP (their BatchNorm statistics and the losses are fp32).
* EMA teacher: sharded exactly like the student (same mesh, same units), so the momentum update is a local,
  communication-free fp32 update of each rank's shards (``base.ema_``).
* Checkpoints: ``torch.distributed.checkpoint`` (sharded, resharding on load: a run saved at N ranks resumes
  at M), plus ``extra.pt`` (method state, grad scaler, train state) and one RNG file per rank.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from sere_scale.engine.distributed import ranks_per_node
from sere_scale.engine.precision import lowp_dtype
from sere_scale.engine.base import Engine, apply_ac_and_compile, ema_, ensure_process_group, rng_state, set_rng_state
from sere_scale.engine.params import last_layer_params, param_groups

log = logging.getLogger("sere_scale")
# SERENet returns views (CLS = tokens[:, 0]); the method never modifies model outputs in place.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")

DCP_DIR = "dcp"
EXTRA_FILE = "extra.pt"


def build_mesh(strategy: str, world: int, device_type: str, node_size: int = 0):
    """1-D mesh ``("shard",)``, or for ``hybrid`` a 2-D ``("replicate", "shard")`` mesh whose shard dimension
    is one node (``node_size`` ranks; 0 = the launcher's ranks per node)."""
    if strategy != "hybrid":
        return init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))
    node = node_size or ranks_per_node(world)
    if node < 1 or world % node:
        raise ValueError(f"config key 'engine.fsdp_node_size': {node} ranks per node do not divide the world "
                         f"size {world}")
    return init_device_mesh(device_type, (world // node, node), mesh_dim_names=("replicate", "shard"))


def mp_policies(precision: str) -> tuple[MixedPrecisionPolicy, MixedPrecisionPolicy]:
    """(backbone policy, heads policy). fp32 reductions in every case; low-precision parameters only in the
    backbone's compute copies."""
    lowp = lowp_dtype(precision)
    if lowp is None:
        return MixedPrecisionPolicy(), MixedPrecisionPolicy()
    return (MixedPrecisionPolicy(param_dtype=lowp, reduce_dtype=torch.float32),
            MixedPrecisionPolicy(reduce_dtype=torch.float32))


def parallelize(net, mesh, precision: str, *, reshard_after_forward: bool, ac: bool, compile_blocks: bool):
    """Activation checkpointing → compile per block → ``fully_shard`` per block, per head, then the root
    (patch embedding, tokens, final norm)."""
    apply_ac_and_compile(net, ac, compile_blocks)
    body, heads = mp_policies(precision)
    plan = net.parallel_plan()
    for blk in plan.blocks:
        fully_shard(blk, mesh=mesh, mp_policy=body, reshard_after_forward=reshard_after_forward)
    for head in plan.heads:
        fully_shard(head, mesh=mesh, mp_policy=heads, reshard_after_forward=reshard_after_forward)
    fully_shard(net, mesh=mesh, mp_policy=body, reshard_after_forward=reshard_after_forward)
    return net


class _ReshardingTeacher:
    """Calls the sharded teacher, then re-shards its root: without a backward, FSDP2 would keep the root's
    parameters gathered after forward."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        out = self.module(*args, **kwargs)
        self.module.reshard()
        return out


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def init_adamw_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's state for every parameter now, as its first ``step`` would (step 0, zero moments).

    Parameters without a gradient (the frozen last layer) keep ``step == 0`` until they get one, exactly as
    with lazily created state, but every checkpoint then holds state for every parameter, so a checkpoint
    written while the last layer is frozen loads into a fresh optimizer with nothing missing or invented."""
    for group in optimizer.param_groups:
        fused_or_capturable = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            st = optimizer.state[p]
            if st:
                continue
            st["step"] = (torch.zeros((), dtype=torch.float32, device=local(p).device) if fused_or_capturable
                          else torch.tensor(0.0, dtype=torch.float32))
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group.get("amsgrad"):
                st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def total_grad_norm(params: list) -> torch.Tensor:
    """Global gradient 2-norm over (possibly sharded) gradients, a full (replicated) device tensor."""
    total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], 2.0)
    return total.full_tensor() if isinstance(total, DTensor) else total


class FSDPEngine(Engine):
    name = "fsdp"

    def __init__(self, cfg, student, teacher, method, info):
        super().__init__(cfg, student, teacher, method, info)
        ensure_process_group(info)
        e = cfg.engine
        student.to(self.device)
        teacher.to(self.device)
        method.to(self.device)
        self.mesh = build_mesh(e.fsdp_strategy, dist.get_world_size(), self.device.type, e.fsdp_node_size)
        parallelize(student, self.mesh, self.precision, reshard_after_forward=(e.fsdp_strategy != "grad_op"),
                    ac=cfg.model.checkpoint_activations, compile_blocks=e.compile)
        # the teacher never runs backward: always re-shard after forward
        parallelize(teacher, self.mesh, self.precision, reshard_after_forward=True, ac=False,
                    compile_blocks=e.compile)
        self.student = student
        self.teacher = _ReshardingTeacher(teacher)
        o = cfg.optim
        cuda = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(param_groups(student), lr=0.0, betas=o.betas, foreach=cuda)
        init_adamw_state(self.optimizer)
        # fp16: found-inf all-reduced over the process group (each rank checks only its gradient shards)
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        self.scaler = self.make_grad_scaler(ShardedGradScaler)
        self._last = last_layer_params(student)
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]
        sp = dict(student.named_parameters())
        self._pairs = [(sp[n], p) for n, p in teacher.named_parameters() if n in sp]
        for s, t in self._pairs:
            if not (isinstance(s, DTensor) and isinstance(t, DTensor) and s.placements == t.placements
                    and s.device_mesh == t.device_mesh and local(s).shape == local(t).shape):
                raise RuntimeError("the teacher is not sharded like the student")

    # ------------------------------------------------------------------ training
    def autocast(self):
        # the backbone computes in param_dtype already; autocast covers the fp32 heads (any device)
        lowp = lowp_dtype(self.precision)
        return torch.autocast(self.device.type, dtype=lowp) if lowp else super().autocast()

    def no_sync(self, active: bool):
        # FSDP2: no reduce-scatter (nor HSDP all-reduce) on accumulation micro-steps; the unsharded gradients
        # accumulate locally and the last micro-step reduces their sum.
        self.student.set_requires_gradient_sync(not active)
        return super().no_sync(active)

    def backward(self, loss):
        self.scaler.scale(loss).backward()

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)
        # A skipped (non-finite) step may leave gradients of earlier no-sync micro-steps accumulated on the
        # unsharded parameters, out of the optimizer's reach: drop them too (FSDP2 has no public call for it).
        for m in self.student_module.modules():
            if isinstance(m, FSDPModule):
                group = getattr(m._get_fsdp_state(), "_fsdp_param_group", None)
                for fp in (group.fsdp_params if group is not None else []):
                    fp.unsharded_accumulated_grad = None
                    unsharded = getattr(fp, "_unsharded_param", None)
                    if unsharded is not None:
                        unsharded.grad = None

    def total_grad_norm(self):
        return total_grad_norm(self._params)

    def step(self, lr, wd, freeze_last_layer, norm=None) -> Optional[torch.Tensor]:
        return self.clipped_step(lr, wd, freeze_last_layer, norm)

    @torch.no_grad()
    def ema_update(self, momentum):
        ema_([local(t) for _, t in self._pairs], [local(s) for s, _ in self._pairs], momentum)

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        msd, osd = get_state_dict(self.student_module, self.optimizer)
        return {"student": msd, "teacher": get_model_state_dict(self.teacher_module), "optimizer": osd}

    def save(self, ckpt_dir, train_state):
        dcp.save(self._state(), checkpoint_id=os.path.join(ckpt_dir, DCP_DIR))
        if self.info.is_main:
            torch.save({"method": self.method.state_dict(), "scaler": self.scaler.state_dict(),
                        "train_state": train_state, "world_size": dist.get_world_size()},
                       os.path.join(ckpt_dir, EXTRA_FILE))
        torch.save(rng_state(), os.path.join(ckpt_dir, f"rng_rank{dist.get_rank():05d}.pt"))

    def load(self, ckpt_dir):
        state = self._state()
        dcp.load(state, checkpoint_id=os.path.join(ckpt_dir, DCP_DIR))
        set_state_dict(self.student_module, self.optimizer, model_state_dict=state["student"],
                       optim_state_dict=state["optimizer"])
        set_model_state_dict(self.teacher_module, state["teacher"])
        extra = torch.load(os.path.join(ckpt_dir, EXTRA_FILE), map_location=self.device, weights_only=False)
        self.method.load_state_dict(extra["method"])
        self.load_grad_scaler(self.scaler, extra["scaler"])
        saved_world = extra.get("world_size", dist.get_world_size())
        rng_file = os.path.join(ckpt_dir, f"rng_rank{dist.get_rank():05d}.pt")
        if saved_world == dist.get_world_size() and os.path.exists(rng_file):
            set_rng_state(torch.load(rng_file, weights_only=False))
        elif self.info.is_main:
            log.warning("checkpoint written by %d ranks, resumed on %d: weights, optimizer and centers are "
                        "resharded exactly; data order and random streams start afresh for the new layout",
                        saved_world, dist.get_world_size())
        return extra["train_state"]

    def teacher_state_dict(self):
        return get_model_state_dict(self.teacher_module,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ---------------------------------------------------------------------- reading a teacher without processes
def read_dcp_prefix(dcp_dir: str | Path, prefix: str) -> dict:
    """Every tensor saved under ``prefix`` (e.g. ``"teacher"``) in a DCP checkpoint, as full CPU tensors,
    read in this process with no process group (any saving world size)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    reader = dcp.FileSystemReader(str(dcp_dir))
    meta = reader.read_metadata()
    head = prefix + "."
    out = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()
           if k.startswith(head) and isinstance(m, TensorStorageMetadata)}
    if not out:
        raise KeyError(f"no '{prefix}' tensors in the checkpoint at {dcp_dir}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(out, storage_reader=reader, no_dist=True)
    return {k[len(head):]: v for k, v in out.items()}


def read_fsdp_teacher(ckpt_dir: str | Path) -> dict:
    return read_dcp_prefix(Path(ckpt_dir) / DCP_DIR, "teacher")


def read_fsdp_student(ckpt_dir: str | Path) -> dict:
    return read_dcp_prefix(Path(ckpt_dir) / DCP_DIR, "student")
