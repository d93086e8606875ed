"""Linear probe on frozen features: features computed once and cached on disk, then a single linear layer
trained with cross-entropy for each learning rate of a small sweep.

Protocol: the L2-normalised CLS features of ``eval.features.extract_features`` are standardised with
the training set's per-channel mean and std (a BatchNorm without affine parameters, as MAE's probe) and fed to one
``nn.Linear``; SGD with momentum 0.9, no weight decay, cosine learning rate, ``epochs`` passes in mini-batches.
The learning rate is chosen on a held-out ``holdout`` fraction of the *training* images (never on the
validation split); the probe is then retrained on the whole training split with that rate and evaluated once
on the validation split.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from sere_scale.data.evaldata import source_id
from sere_scale.eval.features import extract_features
from sere_scale.eval.knn import num_classes

DEFAULT_LRS = (0.03, 0.1, 0.3, 1.0, 3.0)


# ------------------------------------------------------------------------------------------ feature cache
def weights_fingerprint(module: nn.Module) -> str:
    """A digest of a module's parameters and buffers (names, shapes, dtypes and bytes): the same checkpoint
    folder retrained with other weights gets another cache entry."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cached_features(backbone, root, size: int, cache_dir: str | Path, key: dict, batch_size: int = 64,
                    device="cpu", split: str | None = None, num_workers: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    """``extract_features`` once per (key, weights, data, size): stored as ``cache_dir/<hash>.pt`` and reused.
    The weights are identified by ``weights_fingerprint`` of ``backbone``; the data by the resolved folder, or by
    the shard URLs and counts (``evaldata.source_id``)."""
    full_key = {**key, "weights": weights_fingerprint(backbone), **source_id(root, split), "size": int(size)}
    digest = hashlib.sha1(json.dumps(full_key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"features_{digest}.pt"
    if path.exists():
        blob = torch.load(path, map_location="cpu", weights_only=False)
        if blob.get("key") == full_key:
            return blob["feats"], blob["labels"], blob["classes"]
    feats, labels, classes = extract_features(backbone, root, size, batch_size, device, num_workers, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"key": full_key, "feats": feats, "labels": labels, "classes": classes}, tmp)
    tmp.replace(path)
    return feats, labels, classes


# ------------------------------------------------------------------------------------------ the probe
class LinearProbe(nn.Module):
    """Standardisation with fixed (training-set) statistics, then one linear layer."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.fc = nn.Linear(mean.numel(), num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return self.fc((x - self.mean) / self.std)


def train_linear(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, lr: float, epochs: int = 100,
                 batch_size: int = 256, seed: int = 0) -> LinearProbe:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = LinearProbe(feats.mean(0), feats.std(0).clamp_min(1e-6), num_classes).to(feats.device)
    opt = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9)
    n = feats.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total, step = epochs * steps_per_epoch, 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=g).to(feats.device)
        for i in range(0, n, batch_size):
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(probe(feats[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return probe.eval()


@torch.no_grad()
def topk_accuracy(probe: nn.Module, feats: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    logits = probe(feats)
    top1 = (logits.argmax(1) == labels).float().mean().item() * 100
    k = min(5, logits.shape[1])
    top5 = (logits.topk(k, 1).indices == labels[:, None]).any(1).float().mean().item() * 100
    return top1, top5


def linear_probe(train_f, train_y, val_f, val_y, num_classes: int, lrs=DEFAULT_LRS, epochs: int = 100,
                 batch_size: int = 256, holdout: float = 0.1, seed: int = 0) -> dict:
    """Sweep ``lrs`` on a held-out part of the training features, retrain on all of them with the best,
    report top-1 / top-5 (%) on the validation features."""
    n = train_f.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_hold = max(1, round(n * holdout))
    hold, fit = perm[:n_hold].to(train_f.device), perm[n_hold:].to(train_f.device)
    sweep = {}
    for lr in lrs:
        probe = train_linear(train_f[fit], train_y[fit], num_classes, lr, epochs, batch_size, seed)
        sweep[lr] = topk_accuracy(probe, train_f[hold], train_y[hold])[0]
    best = max(lrs, key=lambda lr: (sweep[lr], -lr))  # ties: the smaller rate
    probe = train_linear(train_f, train_y, num_classes, best, epochs, batch_size, seed)
    top1, top5 = topk_accuracy(probe, val_f, val_y)
    return {"top1": top1, "top5": top5, "lr": best, "holdout_top1": {str(k): v for k, v in sweep.items()},
            "epochs": epochs, "n_train": n, "n_val": int(val_f.shape[0])}


def linear_accuracy(backbone, train_root, val_root, size: int, cache_dir: str | Path, key: dict,
                    lrs=DEFAULT_LRS, epochs: int = 100, batch_size: int = 64, device="cpu",
                    num_workers: int = 0) -> dict:
    """Features of both data sets (image folders or shard specs, ``_info.json`` specs defaulting to their
    ``train`` / ``val`` split; cached under ``cache_dir``), then :func:`linear_probe`."""
    tr_f, tr_y, classes = cached_features(backbone, train_root, size, cache_dir, key, batch_size, device, "train",
                                          num_workers)
    va_f, va_y, va_classes = cached_features(backbone, val_root, size, cache_dir, key, batch_size, device, "val",
                                             num_workers)
    try:
        n_cls = num_classes(classes, va_classes, tr_y, va_y)
    except ValueError:
        raise ValueError(f"classes differ between '{train_root}' and '{val_root}'") from None
    return linear_probe(tr_f.to(device), tr_y.to(device), va_f.to(device), va_y.to(device), n_cls, lrs, epochs)


def linear_main(args) -> int:
    from sere_scale.models.load import load_teacher, resolve_checkpoint
    ckpt_dir, run_dir = resolve_checkpoint(args.checkpoint)
    cfg, net = load_teacher(args.checkpoint, random_init=args.random_init)
    out = Path(args.out) if args.out else run_dir / "linear"
    key = {"checkpoint": str(ckpt_dir.resolve()), "random_init": bool(args.random_init)}
    lrs = tuple(float(x) for x in args.lrs.split(",")) if args.lrs else DEFAULT_LRS
    size = cfg.eval.eval_size or cfg.data.global_size
    res = linear_accuracy(net.backbone, args.train_data, args.val_data, size, out, key, lrs, args.epochs,
                          args.batch_size, args.device, args.workers)
    res["checkpoint"], res["random_init"] = str(ckpt_dir), bool(args.random_init)
    out.mkdir(parents=True, exist_ok=True)
    name = "linear_random_init.json" if args.random_init else "linear.json"
    (out / name).write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    return 0
