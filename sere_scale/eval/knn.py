"""Weighted k-NN classification on frozen features (DINO's protocol: cosine, k=20, T=0.07)."""
from __future__ import annotations

import json

import torch

from sere_scale.eval.features import extract_features


@torch.no_grad()
def knn_classify(train_f, train_y, test_f, num_classes: int, k: int = 20, T: float = 0.07,
                 chunk: int = 256) -> torch.Tensor:
    """Class scores (n_test, num_classes): each of the k nearest training features (cosine similarity s)
    votes for its class with weight exp(s / T)."""
    k = min(k, train_f.shape[0])
    scores = []
    for i in range(0, test_f.shape[0], chunk):
        sim = test_f[i:i + chunk] @ train_f.T
        top, idx = sim.topk(k, dim=1)
        w = (top / T).exp()
        votes = torch.zeros(sim.shape[0], num_classes)
        votes.scatter_add_(1, train_y[idx], w)
        scores.append(votes)
    return torch.cat(scores)


def num_classes(classes_tr, classes_va, tr_y, va_y) -> int:
    """Number of classes voted over: that of the class list (folder names or ``_info.json``'s ``classes``; train
    and val must agree when both have one), else (shards without ``_info.json``) the largest label + 1."""
    if classes_tr is not None and classes_va is not None and classes_tr != classes_va:
        raise ValueError(f"train and val classes differ ({len(classes_tr)} vs {len(classes_va)} classes)")
    classes = classes_tr if classes_tr is not None else classes_va
    return len(classes) if classes else int(max(tr_y.max(), va_y.max())) + 1


def knn_accuracy(backbone, train_root, val_root, size: int, k: int = 20, T: float = 0.07,
                 batch_size: int = 64, device="cpu", num_workers: int = 0) -> dict:
    """k-NN top-1/top-5 (%) of ``val_root`` against the features of ``train_root``; each an image folder or a
    shard spec (``data/evaldata.py``; ``_info.json`` specs default to their ``train`` / ``val`` split)."""
    st_tr, st_va = {}, {}
    tr_f, tr_y, classes = extract_features(backbone, train_root, size, batch_size, device, num_workers, "train",
                                           st_tr)
    va_f, va_y, va_classes = extract_features(backbone, val_root, size, batch_size, device, num_workers, "val",
                                              st_va)
    n_cls = num_classes(classes, va_classes, tr_y, va_y)
    scores = knn_classify(tr_f, tr_y, va_f, n_cls, k, T)
    top1 = (scores.argmax(1) == va_y).float().mean().item() * 100
    top5 = (scores.topk(min(5, n_cls), 1).indices == va_y[:, None]).any(1).float().mean().item() * 100
    return {"top1": top1, "top5": top5, "n_train": len(tr_y), "n_val": len(va_y), "k": k, "T": T,
            "n_corrupt_train": st_tr["n_corrupt"], "n_corrupt_val": st_va["n_corrupt"]}


def knn_during_training(cfg, engine, step: int, info, teacher_state=None) -> dict:
    """The training loop's hook (``eval.knn_every`` > 0): at the first logged step at or after each multiple of
    ``knn_every``, k-NN accuracy of the teacher backbone with ``eval.knn_train_path`` as the feature bank and
    ``eval.val_path`` as the queries (folders or shard specs), ``eval.knn_k`` / ``eval.knn_t``, images at
    ``eval.eval_size``. Returns ``knn_top1``, ``knn_top5`` on rank 0, {} elsewhere; as
    ``invariance_during_training``, every rank calls it (gathering the teacher may be collective) and rank 0
    alone extracts the features; ``teacher_state`` as there. The model's random streams are left untouched."""
    from sere_scale.eval.invariance import on_teacher_at
    e = cfg.eval

    def measure(backbone) -> dict:
        res = knn_accuracy(backbone, e.knn_train_path, e.val_path, e.eval_size or cfg.data.global_size, e.knn_k,
                           e.knn_t, cfg.data.batch_size, info.device)
        return {"knn_top1": res["top1"], "knn_top5": res["top5"]}
    return on_teacher_at(cfg, engine, step, e.knn_every, info, teacher_state, measure)


def knn_main(args) -> int:
    from sere_scale.models.load import load_teacher
    cfg, net = load_teacher(args.checkpoint, random_init=args.random_init)
    res = knn_accuracy(net.backbone, args.train_data, args.val_data, cfg.eval.eval_size or cfg.data.global_size,
                       args.k, args.temperature, args.batch_size, num_workers=args.workers)
    print(json.dumps(res))
    return 0
