"""Frozen-backbone feature extraction on labelled image folders."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from ..data.folder import load_rgb, scan_folder
from ..data.multicrop import IMAGENET_MEAN, IMAGENET_STD


def eval_transform(size: int):
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class LabelledFolder(Dataset):
    def __init__(self, root: str, size: int):
        self.items, self.classes = scan_folder(root)
        self.tf = eval_transform(size)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        img = load_rgb(path)
        if img is None:
            return None
        return self.tf(img), label


def _collate(items):
    items = [x for x in items if x is not None]
    return torch.stack([x[0] for x in items]), torch.tensor([x[1] for x in items])


@torch.no_grad()
def extract_features(backbone, root: str, size: int, batch_size: int = 64, device="cpu", num_workers: int = 0):
    """L2-normalised CLS features (normed output of the backbone) and labels of every readable image."""
    ds = LabelledFolder(root, size)
    dl = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=_collate, num_workers=num_workers)
    feats, labels = [], []
    backbone = backbone.to(device).eval()
    for x, y in dl:
        f = backbone(x.to(device))["cls"].float()
        feats.append(F.normalize(f, dim=-1).cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels), ds.classes
