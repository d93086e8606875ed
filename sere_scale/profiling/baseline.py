"""The bare-backbone baseline the issue compares against: timm backbones alone, student forward+backward on
every crop (one forward per crop size), teacher forward on the globals; no heads, losses, optimizer or EMA."""
from __future__ import annotations

import time

import torch

from sere_scale.models.backbone import ViTBackbone, create_vit
from sere_scale.engine.precision import lowp_dtype, resolve_precision


def backbone_baseline(cfg, device: torch.device, steps: int = 10, warmup: int = 2) -> dict:
    d = cfg.data
    torch.manual_seed(0)
    student = ViTBackbone(create_vit(cfg.model, d.global_size, cfg.model.drop_path)).to(device).train()
    teacher = ViTBackbone(create_vit(cfg.model, d.global_size, 0.0)).to(device).train()
    for p in teacher.parameters():
        p.requires_grad_(False)
    B = d.batch_size
    g = torch.randn(d.n_global * B, 3, d.global_size, d.global_size, device=device)
    loc = torch.randn(d.n_local * B, 3, d.local_size, d.local_size, device=device) if d.n_local else None
    precision = resolve_precision(cfg.train.precision, device)
    dtype = lowp_dtype(precision)

    def step():
        ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type,
                                                                                                 enabled=False)
        with ctx:
            with torch.no_grad():
                teacher(g)
            out = student(g)["cls"].float().mean()
            if loc is not None:
                out = out + student(loc)["cls"].float().mean()
        out.backward()
        student.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    mem = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    return {"baseline_img_per_s": B / dt, "baseline_step_time_s": dt, "baseline_peak_memory_bytes": mem}
