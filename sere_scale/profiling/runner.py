"""Run real training steps under timers: throughput, step breakdown, FLOPs/MFU, memory, loader vs model."""
from __future__ import annotations

import resource
import time
from pathlib import Path

import torch

from ..data.device import to_device as _to_device
from ..data.loader import build_train_loader
from ..data.synthetic import SyntheticLoader
from ..distributed import DistInfo, init_distributed
from ..engine import build_engine
from ..method import SEREMethod
from ..models.backbone import patch_size_of
from ..models.network import build_student_teacher
from ..schedules import build_schedules
from .flops import count_flops, device_peak
from .timer import RegionTimer

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
    def __init__(self, cfg, info: DistInfo, synthetic: bool):
        self.cfg, self.info = cfg, info
        torch.manual_seed(cfg.train.seed)
        student, teacher = build_student_teacher(cfg)
        self.method = SEREMethod(cfg, student.backbone.num_heads)
        self.engine = build_engine(cfg, student, teacher, self.method, info)
        self.patch = patch_size_of(cfg.model)
        self.loader = SyntheticLoader(cfg, self.patch) if synthetic else build_train_loader(cfg, info.rank,
                                                                                            info.world_size)
        self.it = self.loader.epoch_iter(0, 0)
        self.epoch, self.n = 0, 0
        self.augment = None
        if cfg.data.augment == "gpu" and not synthetic:
            from ..data.encoded import DeviceAugment
            self.augment = DeviceAugment.from_config(cfg, info.device, info.rank)
        spe = max(self.loader.batches_per_epoch, 1) if not synthetic else 1000
        self.sched = build_schedules(cfg, min(spe, 10**6), info.world_size).at(10**3)
        self.timer = RegionTimer(info.device, enabled=False)
        self.method.timer = self.timer

    def next_batch(self):
        b = next(self.it, None)
        if b is None:
            self.epoch += 1
            self.it = self.loader.epoch_iter(self.epoch, 0)
            b = next(self.it)
        return b

    def step(self):
        t, e, s = self.timer, self.engine, self.sched
        with t("data_wait"):
            batch = self.next_batch()
        with t("host_to_device"):  # includes decode + multi-crop on the device with data.augment=gpu
            self.n += 1
            batch = _to_device(batch, self.info.device, self.augment, (self.epoch, self.n))
        with e.autocast():
            out = self.method(e.student, e.teacher, batch, s)
        with t("backward"):
            e.backward(out["loss"])
        with t("optimizer"):
            e.step(s["lr"], s["wd"], False)
        with t("ema"):
            e.ema_update(s["momentum"])
            self.method.after_step()


def run_profile(cfg, steps: int = 10, warmup: int = 2, synthetic: bool = False, trace: bool = False,
                info: DistInfo | None = None, out_dir: str | None = None) -> dict:
    info = info or init_distributed()
    dev = info.device
    st = _Stepper(cfg, info, synthetic)
    B = cfg.data.batch_size
    for _ in range(warmup):
        st.step()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    # 1) throughput: no synchronisation inside the steps
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        st.step()
    _sync(dev)
    step_time = (time.perf_counter() - t0) / steps

    # 2) breakdown: region timers (synchronising on CUDA)
    st.timer.enabled = True
    st.timer.reset()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        st.step()
    _sync(dev)
    timed_step = (time.perf_counter() - t0) / steps
    breakdown = {k: st.timer.totals.get(k, 0.0) / steps for k in BREAKDOWN}
    st.timer.enabled = False

    # 3) FLOPs, counted once on one real step
    flops = count_flops(st.step)
    peak, peak_src = device_peak(dev, st.engine.precision)

    # 4) the loader alone (real data only) and the model alone (synthetic data)
    loader_ips = None
    if not synthetic:
        t0 = time.perf_counter()
        for i in range(steps):  # data alone: load (+ device decode and multi-crop with data.augment=gpu)
            b = st.next_batch()
            if st.augment is not None:
                _to_device(b, dev, st.augment, (st.epoch, 10**6 + i))
        _sync(dev)
        loader_ips = B * steps / (time.perf_counter() - t0)
        synth = _Stepper(cfg, info, synthetic=True)
        for _ in range(warmup):
            synth.step()
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            synth.step()
        _sync(dev)
        model_ips = B * steps / (time.perf_counter() - t0)
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
        "batch_size_per_device": B,
        "crops": f"{cfg.data.n_global}x{cfg.data.global_size} + {cfg.data.n_local}x{cfg.data.local_size}",
        "arch": cfg.model.arch,
        "synthetic": synthetic,
        "trace": trace_path,
        "steps": steps,
    }
    return result
