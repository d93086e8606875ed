"""Run real training steps under timers: throughput, step breakdown, FLOPs/MFU, memory, loader vs model."""
from __future__ import annotations

import resource
import time
from pathlib import Path

import torch

from sere_scale.data.loader import build_train_loader
from sere_scale.data.synthetic import SyntheticLoader
from sere_scale.engine.distributed import DistInfo, init_distributed
from sere_scale.models.backbone import patch_size_of
from sere_scale.method.schedules import build_schedules
from sere_scale.run.startup import build_parts
from sere_scale.run.step import Batches, train_step
from sere_scale.profiling.flops import count_flops, device_peak
from sere_scale.profiling.timer import RegionTimer

BREAKDOWN = ("data_wait", "host_to_device", "teacher_forward", "student_forward", "losses", "backward",
             "optimizer", "ema")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_memory(device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


class _Stepper:
    """The training step (``step.train_step``: accumulation, ``no_sync``, autocast, the finiteness vote, EMA,
    centers) on the run's loader (or synthetic batches), with a region timer the profile can switch on."""

    def __init__(self, cfg, info: DistInfo, synthetic: bool):
        self.cfg, self.info = cfg, info
        self.method, self.engine = build_parts(cfg, info)
        loader = (SyntheticLoader(cfg, patch_size_of(cfg.model)) if synthetic
                  else build_train_loader(cfg, info.rank, info.world_size))
        augment = None
        if cfg.data.augment == "gpu" and not synthetic:
            from sere_scale.data.encoded import DeviceAugment
            augment = DeviceAugment.from_config(cfg, info.device, info.rank)
        self.batches = Batches(loader, {"epoch": 0, "batch": 0}, info.device, augment)
        spe = max(loader.batches_per_epoch, 1) if not synthetic else 1000
        self.sched = build_schedules(cfg, min(spe, 10**6), info.world_size).at(10**3)
        self.timer = RegionTimer(info.device, enabled=False)
        self.method.timer = self.timer

    def step(self):
        train_step(self.engine, self.method, self.batches, self.sched, self.cfg.train.grad_accum,
                   self.info.world_size, timer=self.timer, freeze_last_layer=False)

    def timed(self, steps: int, regions: bool) -> float:
        """Seconds per step over ``steps`` steps, the device synchronised at both ends only (``regions``: with
        the region timers on, which synchronise on CUDA)."""
        self.timer.enabled = regions
        self.timer.reset()
        _sync(self.info.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        _sync(self.info.device)
        self.timer.enabled = False
        return (time.perf_counter() - t0) / steps


def run_profile(cfg, steps: int = 10, warmup: int = 2, synthetic: bool = False, trace: bool = False,
                info: DistInfo | None = None, out_dir: str | None = None) -> dict:
    info = info or init_distributed()
    dev = info.device
    st = _Stepper(cfg, info, synthetic)
    B = cfg.data.batch_size * cfg.train.grad_accum  # images per device and optimiser step
    for _ in range(warmup):
        st.step()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    step_time = st.timed(steps, regions=False)  # 1) throughput: no synchronisation inside the steps
    timed_step = st.timed(steps, regions=True)  # 2) breakdown: region timers (synchronising on CUDA)
    breakdown = {k: st.timer.totals.get(k, 0.0) / steps for k in BREAKDOWN}

    # 3) FLOPs, counted once on one real step
    flops = count_flops(st.step)
    peak, peak_src = device_peak(dev, st.engine.precision)

    # 4) the loader alone (real data only) and the model alone (synthetic data)
    loader_ips = None
    if not synthetic:
        t0 = time.perf_counter()
        for _ in range(steps):  # data alone: load and move to the device (+ decode, multi-crop: augment=gpu)
            st.batches.next()
        _sync(dev)
        loader_ips = cfg.data.batch_size * steps / (time.perf_counter() - t0)
        synth = _Stepper(cfg, info, synthetic=True)
        for _ in range(warmup):
            synth.step()
        model_ips = B / synth.timed(steps, regions=False)
    else:
        model_ips = B / step_time

    trace_path = None
    if trace and out_dir:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts, record_shapes=True, profile_memory=True) as prof:
            for _ in range(2):
                st.step()
            _sync(dev)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        trace_path = str(Path(out_dir) / f"trace_rank{info.rank}.json")
        prof.export_chrome_trace(trace_path)

    per_dev = B / step_time
    result = {
        "img_per_s": per_dev * info.world_size,
        "img_per_s_per_device": per_dev,
        "step_time_s": step_time,
        "timed_step_time_s": timed_step,
        "step_breakdown_s": breakdown,
        "breakdown_sum_s": sum(breakdown.values()),
        "flops_per_step": flops,
        "flops_per_image": flops / B,
        "mfu": flops / step_time / peak,
        "peak_flops": peak,
        "peak_flops_source": peak_src,
        "peak_memory_bytes": _peak_memory(dev),
        "loader_img_per_s": loader_ips,
        "model_img_per_s": model_ips,
        "bottleneck": ("data loader" if loader_ips is not None and loader_ips < model_ips else "model"),
        "data_wait_frac": breakdown["data_wait"] / max(timed_step, 1e-12),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "world_size": info.world_size,
        "backend": cfg.engine.backend,
        "precision": st.engine.precision,
        "batch_size_per_device": cfg.data.batch_size,
        "grad_accum": cfg.train.grad_accum,
        "crops": f"{cfg.data.n_global}x{cfg.data.global_size} + {cfg.data.n_local}x{cfg.data.local_size}",
        "arch": cfg.model.arch,
        "synthetic": synthetic,
        "trace": trace_path,
        "steps": steps,
    }
    return result
