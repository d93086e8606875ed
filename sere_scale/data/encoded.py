"""``data.augment=gpu``: loaders ship encoded bytes (+ labels and CPU-made iBOT masks); the device augments.

- ``EncodedSSLTransform``: raw bytes → ``{"encoded", "masks"}`` (the masks by ``SSLTransform``'s recipe; not the
  same draws for a sample seed, since the CPU crops use the sample's RNG first).
- ``EncodedImageFolder``: the folder dataset reading file bytes instead of decoding (``shards.ShardLoader`` does the
  same for the stored image members when its transform has ``takes_bytes``).
- ``collate_encoded``: batch ``{"encoded": packed uint8, "encoded_sizes": (B,), "masks", "labels", "n_corrupt"}``
  (``encoded`` may also be a list of B uint8 tensors); any loader (folder, shards) that yields this format
  works with ``DeviceAugment``.
- ``DeviceAugment``: called by the training loop on such a batch with its (epoch, batch index); runs
  ``GPUMultiCrop`` with a generator seeded from (seed, epoch, batch, rank) and returns the usual
  ``collate_ssl`` batch on the device, so a resumed run sees identical crops.
"""
from __future__ import annotations

import logging

import torch

from sere_scale.data.corrupt import NoReadableSample, fill_corrupt, fill_slots
from sere_scale.data.folder import ImageFolderSSL
from sere_scale.data.gpu_multicrop import GPUMultiCrop
from sere_scale.data.masking import MaskGenerator
from sere_scale.data.recipe import AugmentRecipe
from sere_scale.data.transform import sample_rng, sample_seed

log = logging.getLogger(__name__)


class EncodedSSLTransform:
    """Bytes → ``{"encoded": uint8 tensor, "masks": (n_global, h, w) bool}``."""

    takes_bytes = True  # loaders (shards.ShardLoader) hand it the stored bytes instead of a decoded image

    def __init__(self, n_global: int, global_size: int, patch_size: int, masks: MaskGenerator | None = None):
        self.n_global, self.grid, self.masks = n_global, global_size // patch_size, masks

    @classmethod
    def from_config(cls, cfg) -> EncodedSSLTransform:
        d, il = cfg.data, cfg.image_loss
        from sere_scale.config.arch import patch_size_of
        masks = MaskGenerator(il.mask_prob, il.mask_ratio, il.mask_aspect) if il.kind == "ibot" else None
        return cls(d.n_global, d.global_size, patch_size_of(cfg.model), masks)

    def __call__(self, data: bytes) -> dict:
        g = self.grid
        if self.masks is not None:
            masks = torch.stack([self.masks(g, g) for _ in range(self.n_global)])
        else:
            masks = torch.zeros(self.n_global, g, g, dtype=torch.bool)
        enc = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
        return {"encoded": enc, "masks": masks}


class EncodedImageFolder(ImageFolderSSL):
    """Items ``{"encoded", "masks", "label", "index"}``; a ``corrupt.Corrupt`` marker if the file cannot be read
    (decoding, and so the check for corrupt content, happens on the device)."""

    def __getitem__(self, index: int):
        path, label = self.items[index]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            log.warning("skipping unreadable image %s: %s", path, e)
            return self.corrupt(index)
        with sample_rng(self.seed, self.epoch, index):
            out = self.transform(data)
        out["label"], out["index"] = label, index
        return out


def collate_encoded(samples: list) -> dict:
    """Batch of ``len(samples)`` encoded samples; corrupt ones (``None`` or ``corrupt.Corrupt``) are replaced by
    readable ones of the batch (``corrupt.fill_corrupt``) and counted in ``n_corrupt``.

    The images travel packed in one uint8 tensor ``encoded`` with their byte counts ``encoded_sizes`` (one
    shared-memory segment per batch from a worker, not one per image); ``split_encoded`` unpacks them.
    """
    good, n_bad = fill_corrupt(samples)
    enc = [s["encoded"].reshape(-1) for s in good]
    out = {"encoded": torch.cat(enc),
           "encoded_sizes": torch.tensor([e.numel() for e in enc], dtype=torch.long),
           "labels": torch.tensor([int(s.get("label", -1)) for s in good], dtype=torch.long),
           "n_corrupt": n_bad}
    out["masks"] = torch.stack([s["masks"] for s in good])
    if "index" in good[0]:
        out["index"] = torch.tensor([int(s["index"]) for s in good], dtype=torch.long)
    return out


def split_encoded(batch: dict) -> list:
    """The batch's images as a list of 1-D uint8 tensors (views into the packed tensor, or the list as given)."""
    enc = batch["encoded"]
    if isinstance(enc, torch.Tensor):
        return list(enc.split(batch["encoded_sizes"].tolist())) if len(batch["encoded_sizes"]) else []
    return list(enc)


class DeviceAugment:
    """Encoded batch → ``collate_ssl``-style batch on the device (crops, boxes, flips, masks, labels).

    Images that do not decode keep their slot: it takes the crops (and mask, label, index) of the next decoded
    image of the batch (``corrupt.fill_slots``) and is counted in ``n_corrupt``. A batch in which no image decodes
    is replaced by the previous batch with a decodable image (kept encoded, on the host), cropped afresh with this
    batch's seed (if there is none yet, ``NoReadableSample``); only this last case depends on the run's history (a
    resume at that very batch would fail instead).
    """

    def __init__(self, multicrop: GPUMultiCrop, seed: int = 0, rank: int = 0):
        self.multicrop, self.seed, self.rank = multicrop, seed, rank
        self._last_good = None

    @classmethod
    def from_config(cls, cfg, device, rank: int = 0) -> DeviceAugment:
        mc = GPUMultiCrop(recipe=AugmentRecipe.from_config(cfg), device=device)
        return cls(mc, cfg.train.seed, rank)

    def __call__(self, batch: dict, epoch: int, index: int) -> dict:
        g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index, self.rank))
        images = split_encoded(batch)
        res = self.multicrop(images, generator=g)
        kept, dev, B = res["kept"], self.multicrop.device, len(images)
        if len(kept) == 0:
            if self._last_good is None:
                raise NoReadableSample(f"no image of batch {index} (epoch {epoch}) decodes, nor of any before it")
            log.warning("no image of batch %d (epoch %d) decodes: it takes the previous readable batch's images",
                        index, epoch)
            return {**self(self._last_good, epoch, index), "n_corrupt": batch["n_corrupt"] + B}
        src = torch.tensor(fill_slots(kept.tolist(), B), dtype=torch.long)
        take = kept[src]  # slot -> batch position of the image it holds
        out = {k: v for k, v in batch.items() if k not in ("encoded", "encoded_sizes")}
        src_dev = src.to(res["boxes"].device)
        out.update(crops=[c[src_dev] for c in res["crops"]], boxes=res["boxes"][src_dev],
                   flips=res["flips"][src_dev], n_corrupt=batch["n_corrupt"] + B - len(kept))
        for k in ("masks", "labels", "index"):
            if k in batch and len(batch[k]) == B:
                out[k] = batch[k][take].to(dev)
        self._last_good = batch  # encoded bytes on the host: small
        return out
