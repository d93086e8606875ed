"""Weighted k-NN classification on frozen features (DINO's protocol: cosine, k=20, T=0.07)."""
from __future__ import annotations

import json

import torch

from .features import extract_features


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


def knn_accuracy(backbone, train_root: str, val_root: str, size: int, k: int = 20, T: float = 0.07,
                 batch_size: int = 64, device="cpu") -> dict:
    tr_f, tr_y, classes = extract_features(backbone, train_root, size, batch_size, device)
    va_f, va_y, _ = extract_features(backbone, val_root, size, batch_size, device)
    scores = knn_classify(tr_f, tr_y, va_f, len(classes), k, T)
    top1 = (scores.argmax(1) == va_y).float().mean().item() * 100
    top5 = (scores.topk(min(5, len(classes)), 1).indices == va_y[:, None]).any(1).float().mean().item() * 100
    return {"top1": top1, "top5": top5, "n_train": len(tr_y), "n_val": len(va_y), "k": k, "T": T}


def knn_main(args) -> int:
    from ..models.load import load_teacher
    cfg, net = load_teacher(args.checkpoint, random_init=args.random_init)
    res = knn_accuracy(net.backbone, args.train_data, args.val_data, cfg.eval.eval_size or cfg.data.global_size,
                       args.k, args.temperature, args.batch_size)
    print(json.dumps(res))
    return 0
