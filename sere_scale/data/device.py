"""Moving a collated batch to the training device (shared by the training loop and the profiler)."""
from __future__ import annotations

import torch


def to_device(batch: dict, device: torch.device, augment=None, position: tuple = (0, 0)) -> dict:
    """Move a batch to ``device``; an encoded batch (``data.augment=gpu``) is first decoded and multi-cropped
    there by ``augment`` (``data.encoded.DeviceAugment``), seeded by ``position`` = (epoch, batch index)."""
    nb = device.type == "cuda"
    if "encoded" in batch:
        if augment is None:
            raise ValueError("an encoded batch (data.augment=gpu) needs a DeviceAugment: pass augment=")
        batch = augment(batch, *position)
    out = dict(batch)
    out["crops"] = [c.to(device, non_blocking=nb) for c in batch["crops"]]
    for k in ("boxes", "flips", "masks", "labels"):
        out[k] = batch[k].to(device, non_blocking=nb)
    return out
