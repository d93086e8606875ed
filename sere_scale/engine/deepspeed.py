"""DeepSpeed ZeRO engine (stages 1, 2, 3) through ``deepspeed.initialize`` with our own torch AdamW.

* Config: generated from ours (``deepspeed_config.py``): micro-batch, gradient accumulation, bf16/fp16 (dynamic
  loss scaling), ZeRO stage, global-norm clipping; a user JSON (``engine.deepspeed_config``) is merged on top.
  It may not define an optimizer or a scheduler: lr and weight decay are set on the param groups every step.
* Gradient accumulation: ``no_sync`` sets DeepSpeed's accumulation boundary (``set_gradient_accumulation_
  boundary``), our ``backward`` does not rescale (the loop already divides by ``train.grad_accum``) and
  ``step`` is called once per optimizer step, on the boundary.
* Frozen last layer: its parameters have their own param group. While frozen, its gradient partitions are
  zeroed before DeepSpeed's step (so they are out of the clipped global norm), its lr and weight decay are 0
  (no change to the weights) and its AdamW step count is put back to 0: exactly the state of a parameter
  that has had no gradient yet, as under DDP/FSDP (gradients through ``deepspeed.utils``' setters, AdamW
  states found by a step pre-hook on our AdamW).
* EMA teacher, always from the fp32 master weights:
  - ZeRO-1/2: the teacher is a full fp32 module on every rank. Each rank updates the fragments whose fp32
    masters it owns (``param._hp_mapping``, DeepSpeed's low/high-precision fragment map behind
    ``safe_get_full_fp32_param``: private, see docs/ARCHITECTURE.md), then one all-gather shares them.
  - ZeRO-3: the teacher is partitioned exactly like the student (a parameter-only ZeRO-3 DeepSpeed engine);
    each rank updates its fp32 partition from ``safe_get_local_fp32_param`` with no communication.
* Checkpoints: DeepSpeed's ``save_checkpoint``/``load_checkpoint`` (modules, fp32 masters, optimizer, loss
  scaler) in ``deepspeed/``; the teacher in ``teacher.pt`` (ZeRO-1/2) or ``teacher_rank*.pt`` fp32 partitions
  (ZeRO-3, consolidated by ``read_deepspeed_teacher``); ``extra.pt`` (method state, train state) and one RNG
  file per rank. A DeepSpeed checkpoint resumes at the world size that wrote it.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
from typing import Optional

import torch
import torch.distributed as dist

from sere_scale.engine.distributed import ranks_per_node
from sere_scale.engine.precision import lowp_dtype
from sere_scale.engine.base import (Engine, apply_ac_and_compile, cast_floating, ema_, ensure_process_group,
                                    load_rng_state, rng_state)
from sere_scale.engine.deepspeed_config import deepspeed_config
from sere_scale.engine.deepspeed_readers import DS_TAG, TEACHER_FILE
from sere_scale.engine.params import param_groups

log = logging.getLogger("sere_scale")

EXTRA_FILE = "extra.pt"
# torch >= 2.14 renames all_gather_into_tensor (same arguments)
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# ---------------------------------------------------------------------------------------------- callables
class _CastInputs:
    """Calls a DeepSpeed engine whose module DeepSpeed cast to bf16/fp16, with inputs cast to match."""

    def __init__(self, engine, dtype: Optional[torch.dtype]):
        self.engine, self.dtype = engine, dtype

    def __call__(self, *args, **kwargs):
        if self.dtype is not None:
            args, kwargs = cast_floating(args, self.dtype), cast_floating(kwargs, self.dtype)
        return self.engine(*args, **kwargs)


class _Autocast:
    """Calls the fp32 teacher (ZeRO-1/2) under autocast to the training precision."""

    def __init__(self, module, device_type: str, dtype: Optional[torch.dtype]):
        self.module, self.device_type, self.dtype = module, device_type, dtype

    def __call__(self, *args, **kwargs):
        ctx = torch.autocast(self.device_type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()
        with ctx:
            return self.module(*args, **kwargs)


class _FragmentEMA:
    """ZeRO-1/2: the full fp32 teacher updated from the fp32 master fragments this rank owns, then shared.

    A fragment is the slice ``[start, start + numel)`` of a flattened parameter whose fp32 master lives in this
    rank's optimizer partition; across ranks the fragments tile every parameter exactly once."""

    def __init__(self, pairs: list, group=None):
        self.pairs = pairs
        self.group = group
        mine = []
        for i, (s, t) in enumerate(pairs):
            m = getattr(s, "_hp_mapping", None)
            if not t.is_contiguous():
                raise RuntimeError("the teacher's parameters must be contiguous")
            if m is not None:
                mine.append((i, m.lp_fragment_address.start, m.lp_fragment_address.numel))
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        every = [None] * self.world
        dist.all_gather_object(every, mine, group=group)
        self.every = every
        self.width = max(sum(n for _, _, n in f) for f in every)
        covered = [0] * len(pairs)
        for frags in every:
            for i, _, n in frags:
                covered[i] += n
        missing = [i for i, (s, _) in enumerate(pairs) if covered[i] != s.numel()]
        if missing:
            raise RuntimeError(f"ZeRO fp32 master fragments do not tile {len(missing)} parameters")

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        mine = self.every[self.rank]
        t_frags = [self.pairs[i][1].data.view(-1).narrow(0, st, n) for i, st, n in mine]
        masters = [self.pairs[i][0]._hp_mapping.get_hp_fragment() for i, _, _ in mine]
        ema_(t_frags, masters, momentum)
        if self.world == 1:
            return
        dev = self.pairs[0][1].device
        send = torch.zeros(self.width, dtype=torch.float32, device=dev)
        if t_frags:
            torch.cat(t_frags, out=send[: sum(f.numel() for f in t_frags)])
        recv = torch.empty(self.width * self.world, dtype=torch.float32, device=dev)
        _all_gather_flat(recv, send, group=self.group)
        for r, frags in enumerate(self.every):
            if r == self.rank:
                continue
            off = r * self.width
            for i, st, n in frags:
                self.pairs[i][1].data.view(-1).narrow(0, st, n).copy_(recv[off:off + n])
                off += n


# ---------------------------------------------------------------------------------------------- the engine
def parallelize(student, teacher, cfg, ds_config: dict):
    """Activation checkpointing → compile per block → ZeRO: ``deepspeed.initialize`` of the student with our
    AdamW (the last layer in its own group); under ZeRO-3 also of the teacher (parameters only, partitioned
    exactly like the student's). Returns (student engine, our AdamW (which ZeRO steps on its fp32 partitions),
    teacher engine or None)."""
    import deepspeed
    apply_ac_and_compile(student, cfg.model.checkpoint_activations, cfg.engine.compile)
    apply_ac_and_compile(teacher, False, cfg.engine.compile)
    opt = torch.optim.AdamW(param_groups(student, split_last_layer=True), lr=0.0, betas=cfg.optim.betas)
    ds = deepspeed.initialize(model=student, optimizer=opt, config=ds_config, dist_init_required=False)[0]
    if int(ds_config["zero_optimization"]["stage"]) != 3:
        return ds, opt, None
    tcfg = copy.deepcopy(ds_config)
    tcfg.pop("gradient_clipping", None)
    tz = {k: v for k, v in tcfg["zero_optimization"].items() if k != "offload_optimizer"}
    tz.update(stage=3, stage3_param_persistence_threshold=0, stage3_model_persistence_threshold=0)
    tcfg["zero_optimization"] = tz
    return ds, opt, deepspeed.initialize(model=teacher, config=tcfg, dist_init_required=False)[0]


def _fp32_buffers(module) -> None:
    """DeepSpeed's bf16/fp16 mode casts buffers too: keep BatchNorm running statistics in fp32."""
    for m in module.modules():
        for k, b in m._buffers.items():
            if b is not None and b.is_floating_point() and b.dtype != torch.float32:
                m._buffers[k] = b.float()


class DeepSpeedEngine(Engine):
    name = "deepspeed"
    # DeepSpeed's backward counts micro-steps and reduces gradients at the accumulation boundary: it must never
    # run on a loss that is non-finite on some rank, so the step votes before every micro-batch's backward
    check_every_micro_batch = True

    def __init__(self, cfg, student, teacher, method, info):
        super().__init__(cfg, student, teacher, method, info)
        if self.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from sere_scale.engine.capabilities import deepspeed_precision_problem
        problem = deepspeed_precision_problem(self.precision)
        if problem:  # instead of DeepSpeed's "Type fp16 is not supported on your device." from every rank
            from sere_scale.config.load import ConfigError
            raise ConfigError(f"config key 'train.precision': {problem}; use another train.precision, or "
                              f"engine.backend=ddp/fsdp (torch autocast)")
        # what torchrun would have set, when the ranks came from srun or from nothing (one process): DeepSpeed
        # asserts LOCAL_RANK
        for name, value in (("RANK", info.rank), ("WORLD_SIZE", info.world_size), ("LOCAL_RANK", info.local_rank),
                            ("LOCAL_WORLD_SIZE", ranks_per_node(info.world_size))):
            os.environ.setdefault(name, str(value))
        import deepspeed
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        ensure_process_group(info)
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo",
                                   dist_init_required=False)
        self.world = dist.get_world_size()
        self.ds_config = deepspeed_config(cfg, self.world, self.precision)
        self.stage = int(self.ds_config["zero_optimization"]["stage"])
        self.lowp = lowp_dtype(self.precision)
        self._pending, self._warned_pending = False, False
        student.to(self.device)
        teacher.to(self.device)
        method.to(self.device)
        self.ds, self._adamw, teacher_ds = parallelize(student, teacher, cfg, self.ds_config)
        self._last_flats: dict = {}
        self._adamw.register_step_pre_hook(self._note_stepped_flats)
        self.optimizer = self.ds.optimizer
        self.student_module = self.ds.module
        _fp32_buffers(self.ds.module)
        self.student = _CastInputs(self.ds, self.lowp)
        frozen = self.ds.module.parallel_plan().is_frozen_early
        self._last = [p for n, p in self.ds.module.named_parameters() if frozen(n)]
        n_teacher = len(list(teacher.named_parameters()))
        if self.stage == 3:
            self.teacher_ds = teacher_ds
            self.teacher_module = self.teacher_ds.module
            _fp32_buffers(self.teacher_module)
            self.teacher = _CastInputs(self.teacher_ds, self.lowp)
            sp = dict(self.ds.module.named_parameters())
            self._pairs = [(sp[n], p) for n, p in self.teacher_module.named_parameters() if n in sp]
            from deepspeed.utils import safe_get_local_fp32_param
            self._t32 = []
            for s, t in self._pairs:
                master = safe_get_local_fp32_param(s)
                if master.numel() != t.ds_tensor.numel():
                    raise RuntimeError("the ZeRO-3 teacher is not partitioned like the student")
                # the teacher starts as the student: its fp32 partition is the student's fp32 master partition
                self._t32.append(t.ds_tensor if t.ds_tensor.dtype == torch.float32 else master.detach().clone())
        else:
            self.teacher_module = teacher
            self.teacher = _Autocast(teacher, self.device.type, self.lowp)
            sp = dict(self.ds.module.named_parameters())
            self._pairs = [(sp[n], p) for n, p in teacher.named_parameters() if n in sp]
            self._frag = _FragmentEMA(self._pairs)
        if len(self._pairs) != n_teacher:
            raise RuntimeError("the teacher's parameters do not match the student's")

    # ------------------------------------------------------------------ training
    def autocast(self):
        return contextlib.nullcontext()  # DeepSpeed runs the student in its precision; the teacher casts

    def no_sync(self, active: bool):
        self.ds.set_gradient_accumulation_boundary(not active)
        return super().no_sync(active)

    def backward(self, loss):
        self.ds.backward(loss, scale_wrt_gas=False)  # the loop already divides by train.grad_accum
        self._pending = True

    def zero_grad(self):
        if self._pending and not self._warned_pending:
            # DeepSpeed keeps reduced micro-batch gradients in its partition buffers until its step
            log.warning("deepspeed: a step was dropped after some of its micro-batches ran backward; DeepSpeed "
                        "cannot discard their reduced gradients, which join the next step (use "
                        "train.grad_accum=1 or train.nonfinite=stop for exact skips)")
            self._warned_pending = True
        self.ds.zero_grad()
        if hasattr(self.ds.optimizer, "zero_grad"):
            self.ds.optimizer.zero_grad()

    def _zero_last_layer_grads(self):
        """Zero the frozen parameters' reduced gradient partitions before DeepSpeed's step (``deepspeed.utils``
        setters: at the accumulation boundary ZeRO-1/2 hold the gradient in the partition, ``param.grad`` is
        None, and ``safe_set_full_grad`` writes this rank's fragment)."""
        from deepspeed.utils import safe_set_full_grad, safe_set_local_grad
        for p in self._last:
            if self.stage == 3:
                safe_set_local_grad(p, torch.zeros(p.ds_tensor.numel(), dtype=torch.float32, device=self.device))
            else:
                safe_set_full_grad(p, torch.zeros(p.shape, dtype=torch.float32, device=self.device))

    def _note_stepped_flats(self, optimizer, args, kwargs) -> None:
        """Step pre-hook of our AdamW: ZeRO steps it on its flat fp32 partitions (ZeRO-3 one sub-group at a
        time, swapping each into its param group only while stepping); remember those of the last layer's group."""
        for g in optimizer.param_groups:
            if g.get("last_layer"):
                for f in g["params"]:
                    self._last_flats[id(f)] = f

    def _last_layer_states(self) -> list:
        """AdamW states of the last layer's flat fp32 partition(s) stepped by the last ``ds.step``."""
        return [self._adamw.state[f] for f in self._last_flats.values() if f in self._adamw.state]

    def step(self, lr, wd, freeze_last_layer, norm=None) -> Optional[float]:
        # ``norm`` is never given (check_every_micro_batch): ZeRO computes the global norm itself and skips the
        # step on a non-finite one (its overflow check, under every precision): ``step_skipped``
        self.set_lr_wd(self.optimizer, lr, wd)
        # looked up every step: loading a checkpoint replaces the optimizer's group dicts
        last_groups = [g for g in self.optimizer.param_groups if g.get("last_layer")]
        if freeze_last_layer and last_groups:
            self._zero_last_layer_grads()
            for g in last_groups:
                g["lr"], g["weight_decay"] = 0.0, 0.0
        self._last_flats = {}
        self.ds.step()
        self._pending = False
        # DeepSpeed skipped the step on an inf/NaN gradient (overflow all-reduced over ranks): fp16's loss scaler,
        # or under bf16/fp32 ZeRO's invalid-norm check (a non-finite step for ``run/step.py``)
        self.step_skipped = not self.ds.was_step_applied()
        if freeze_last_layer:
            if last_groups and not self.step_skipped and not self._last_flats:
                raise RuntimeError("deepspeed: the optimizer step did not go through our AdamW's step (its "
                                   "pre-hook saw no last-layer partition); cannot keep the frozen layer's state")
            # no update happened; forget the step count too (a never-stepped parameter has none)
            for st in self._last_layer_states():
                if "step" in st:
                    if torch.is_tensor(st["step"]):
                        st["step"].zero_()
                    else:
                        st["step"] = 0
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    def loss_scale(self):
        return float(self.ds.optimizer.loss_scale) if self.precision == "fp16" else None

    @torch.no_grad()
    def ema_update(self, momentum):
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_fp32_param
            masters = [safe_get_local_fp32_param(s) for s, _ in self._pairs]
            ema_(self._t32, masters, momentum)
            for (_, t), t32 in zip(self._pairs, self._t32):
                if t.ds_tensor is not t32:
                    t.ds_tensor.copy_(t32)
        else:
            self._frag.update(momentum)

    # ------------------------------------------------------------------ checkpoints
    def saved_tensors(self) -> list:
        out = super().saved_tensors()
        if self.stage == 3:  # the teacher's fp32 partitions, which teacher_rank*.pt holds
            out += [(f"teacher.{n} (fp32 partition)", t32) for (n, _), t32 in
                    zip(self.teacher_module.named_parameters(), self._t32)]
        return out

    def _teacher_shard(self) -> dict:
        names = [n for n, _ in self.teacher_module.named_parameters()]
        shard = {"world_size": self.world, "names": names,
                 "shapes": [tuple(t.ds_shape) for _, t in self._pairs],
                 "partitions": [x.detach().float().cpu().clone() for x in self._t32]}
        if self.info.is_main:
            shard["buffers"] = self._teacher_buffers()
        return shard

    def _teacher_buffers(self) -> dict:
        """The teacher's state-dict entries that are not parameters (BatchNorm statistics), on CPU."""
        params = {n for n, _ in self.teacher_module.named_parameters()}
        return {k: v.detach().cpu().clone() for k, v in self.teacher_module.state_dict().items() if k not in params}

    def save(self, ckpt_dir, train_state):
        # save_latest: the step folder gets DeepSpeed's own ``latest`` file (→ tag), so DeepSpeed's
        # ``zero_to_fp32.py STEP_DIR OUT`` converts it (the student) with no flags
        self.ds.save_checkpoint(ckpt_dir, tag=DS_TAG, client_state={}, save_latest=True)
        rank = dist.get_rank()
        if self.stage == 3:
            torch.save(self._teacher_shard(), os.path.join(ckpt_dir, f"teacher_rank{rank:05d}.pt"))
        elif self.info.is_main:
            torch.save(self.teacher_module.state_dict(), os.path.join(ckpt_dir, TEACHER_FILE))
        if self.info.is_main:
            torch.save({"method": self.method.state_dict(), "train_state": train_state, "world_size": self.world,
                        "zero_stage": self.stage}, os.path.join(ckpt_dir, EXTRA_FILE))
        torch.save(rng_state(), os.path.join(ckpt_dir, f"rng_rank{rank:05d}.pt"))

    def load(self, ckpt_dir):
        extra = torch.load(os.path.join(ckpt_dir, EXTRA_FILE), map_location=self.device, weights_only=False)
        if extra["world_size"] != self.world or extra["zero_stage"] != self.stage:
            raise RuntimeError(f"{ckpt_dir}: a DeepSpeed checkpoint of ZeRO-{extra['zero_stage']} at "
                               f"{extra['world_size']} ranks cannot resume ZeRO-{self.stage} at {self.world} ranks "
                               f"(use engine.backend=fsdp to change the world size)")
        path, _ = self.ds.load_checkpoint(ckpt_dir, tag=DS_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load its checkpoint from {ckpt_dir}/{DS_TAG}")
        rank = dist.get_rank()
        if self.stage == 3:
            shard = torch.load(os.path.join(ckpt_dir, f"teacher_rank{rank:05d}.pt"), weights_only=False)
            for (_, t), t32, saved in zip(self._pairs, self._t32, shard["partitions"]):
                t32.copy_(saved)
                if t.ds_tensor is not t32:
                    t.ds_tensor.copy_(t32)
            buffers = shard.get("buffers")
            if buffers is None:
                buffers = torch.load(os.path.join(ckpt_dir, "teacher_rank00000.pt"), weights_only=False)["buffers"]
            own = dict(self.teacher_module.named_buffers())
            for n, b in buffers.items():
                own[n].copy_(b)
        else:
            sd = torch.load(os.path.join(ckpt_dir, TEACHER_FILE), map_location=self.device, weights_only=False)
            self.teacher_module.load_state_dict(sd)
        self.method.load_state_dict(extra["method"])
        load_rng_state(ckpt_dir, rank)
        return extra["train_state"]

    def teacher_state_dict(self):
        if self.stage != 3:
            return self.teacher_module.state_dict()
        out = {}
        for (n, t), t32 in zip([(n, t) for n, t in self.teacher_module.named_parameters()], self._t32):
            full = torch.empty(t32.numel() * self.world, dtype=torch.float32, device=t32.device)
            _all_gather_flat(full, t32.contiguous())
            out[n] = full[: t.ds_numel].view(t.ds_shape).cpu()
        out.update(self._teacher_buffers())
        return out
