"""Multi-crop on the device for a whole batch of encoded images, with the box/flip contract of ``MultiCrop``.

``GPUMultiCrop(...)(encoded, generator)`` decodes a list of encoded images (nvJPEG on CUDA, PIL fallback per
image), then for every image and view: RandomResizedCrop + flip by one ``roi_align`` call per crop size (images of
different sizes are padded into size groups), the photometric recipe of ``MultiCrop`` (colour jitter in a
random order per view, grayscale, Gaussian blur with a per-view sigma, solarize) and ImageNet normalisation.

Every random parameter is drawn on the CPU from ``generator`` (vectorised over the batch), so the result does
not depend on the device and a (seed, epoch, batch) seed reproduces a batch exactly. The distributions are those
of ``MultiCrop`` (see ``draw_params``). Differences from the CPU path, by design: resampling is area-averaged
bilinear (``roi_align`` with adaptive sampling) instead of PIL's bicubic; intermediate values are not rounded
to 8 bits between photometric steps; the blur kernel is a sampled Gaussian truncated at 3·2.0 px, not PIL's
three box passes.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchvision.ops import roi_align

from sere_scale.data import gpu_ops
from sere_scale.data.decode import DecodeStats, decode_images
from sere_scale.data.multicrop import AugmentRecipe, RecipeViews


def sample_crops(sizes_hw: torch.Tensor, scale_lo: torch.Tensor, scale_hi: torch.Tensor,
                 g: torch.Generator | None, tries: int = 10, ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """RandomResizedCrop boxes (left, top, w, h) in pixels, shape (B, V, 4), for images of ``sizes_hw`` (B, 2)
    and per-view scale ranges (V,): the algorithm of ``recipe.sample_crop`` vectorised (first of ``tries``
    valid draws, else the central crop of the aspect ratio clamped into ``ratio``)."""
    RATIO = tuple(ratio)
    B, V = sizes_hw.shape[0], scale_lo.shape[0]
    H = sizes_hw[:, 0].double().view(B, 1, 1)
    W = sizes_hw[:, 1].double().view(B, 1, 1)
    u_area = torch.rand(B, V, tries, generator=g, dtype=torch.float64)
    u_ratio = torch.rand(B, V, tries, generator=g, dtype=torch.float64)
    u_pos = torch.rand(B, V, 2, generator=g, dtype=torch.float64)
    lo, hi = scale_lo.double().view(1, V, 1), scale_hi.double().view(1, V, 1)
    target = H * W * (lo + (hi - lo) * u_area)
    ar = torch.exp(math.log(RATIO[0]) + (math.log(RATIO[1]) - math.log(RATIO[0])) * u_ratio)
    w = torch.round(torch.sqrt(target * ar))
    h = torch.round(torch.sqrt(target / ar))
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = ok.to(torch.uint8).argmax(-1, keepdim=True)  # index of the first valid try
    found = ok.any(-1)
    w = w.gather(-1, first).squeeze(-1)
    h = h.gather(-1, first).squeeze(-1)
    H2, W2 = H.view(B, 1).expand(B, V), W.view(B, 1).expand(B, V)
    # fallback: central crop, aspect ratio clamped into RATIO
    in_ratio = W2 / H2
    fw = torch.where(in_ratio > RATIO[1], torch.round(H2 * RATIO[1]), W2)
    fh = torch.where(in_ratio < RATIO[0], torch.round(W2 / RATIO[0]), H2)
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    top = torch.where(found, torch.floor(u_pos[..., 0] * (H2 - h + 1)).clamp_max(H2 - h),
                      torch.div(H2 - h, 2, rounding_mode="floor"))
    left = torch.where(found, torch.floor(u_pos[..., 1] * (W2 - w + 1)).clamp_max(W2 - w),
                       torch.div(W2 - w, 2, rounding_mode="floor"))
    return torch.stack([left, top, w, h], -1)


class GPUMultiCrop(RecipeViews):
    """Batched multi-crop on ``device``; ``__call__(encoded, generator)`` →
    ``{"crops": [V × (B,3,S,S)], "boxes": (B,V,4), "flips": (B,V), "kept": (B,) indices}`` (crops, boxes and
    flips on ``device``; views globals first, as ``MultiCrop``).

    ``kept`` lists the input positions that decoded (undecodable images are dropped and counted in
    ``n_failed``); ``n_fallback`` counts images decoded by PIL instead of the batched decoder.
    """

    def __init__(self, *args, device="cpu", max_group_pixels: int = 2**26, recipe: AugmentRecipe | None = None,
                 **fields):
        """``GPUMultiCrop(recipe=r, device=...)``, or the recipe's fields as for ``MultiCrop``."""
        self.recipe = recipe if recipe is not None else AugmentRecipe(*args, **fields)
        self.device = torch.device(device)
        self.mean = torch.tensor(self.recipe.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.recipe.std, device=self.device).view(1, 3, 1, 1)
        self.max_group_pixels = max_group_pixels
        self.stats = DecodeStats()

    @property
    def n_fallback(self) -> int:
        return self.stats.fallback

    @property
    def n_failed(self) -> int:
        return self.stats.failed

    # ---- parameters (CPU, vectorised over the batch) ----
    def draw_params(self, sizes_hw: torch.Tensor, g: torch.Generator | None) -> dict:
        """All random parameters of a batch, each (B, V[, ...]). Order of draws is fixed (reproducible)."""
        r = self.recipe
        B, V = sizes_hw.shape[0], r.n_views
        is_g = torch.arange(V) < r.n_global
        lo = torch.where(is_g, r.global_scale[0], r.local_scale[0])
        hi = torch.where(is_g, r.global_scale[1], r.local_scale[1])
        p = {"crop": sample_crops(sizes_hw, lo, hi, g, ratio=r.ratio),
             "flip": torch.rand(B, V, generator=g) < r.flip_p}
        u = torch.rand(B, V, 4, generator=g)
        p["jitter"] = u[..., 0] < r.jitter_p
        p["gray"] = u[..., 1] < r.gray_p
        probs = torch.tensor([r.view_probs(v) for v in range(V)])  # (V, 2): blur, solarize
        p["blur"] = u[..., 2] < probs[:, 0]
        p["solarize"] = u[..., 3] < probs[:, 1]
        uf = torch.rand(B, V, 4, generator=g)
        ranges = r.jitter_ranges()
        lo_f, hi_f = torch.tensor([q[0] for q in ranges]), torch.tensor([q[1] for q in ranges])
        p["factors"] = lo_f + (hi_f - lo_f) * uf  # brightness, contrast, saturation, hue
        p["order"] = torch.rand(B, V, 4, generator=g).argsort(-1)  # a uniform random permutation per view
        sigma = r.blur_sigma
        p["sigma"] = sigma[0] + (sigma[1] - sigma[0]) * torch.rand(B, V, generator=g)
        return p

    # ---- geometry ----
    def _groups(self, sizes: list) -> list:
        """Image indices in groups (similar sizes together) whose padded batch stays under max_group_pixels."""
        order = sorted(range(len(sizes)), key=lambda i: sizes[i])
        groups, cur, mh, mw = [], [], 0, 0
        for i in order:
            h, w = sizes[i]
            nh, nw = max(mh, h + 1), max(mw, w + 1)
            if cur and (len(cur) + 1) * nh * nw > self.max_group_pixels:
                groups.append(cur)
                cur, nh, nw = [], h + 1, w + 1
            cur.append(i)
            mh, mw = nh, nw
        if cur:
            groups.append(cur)
        return groups

    @staticmethod
    def _pad(imgs: list) -> torch.Tensor:
        """Float batch (G, 3, Hm, Wm); each image's last row/column repeated once, so bilinear samples at the
        image border read the edge value (as on the unpadded image) instead of padding."""
        hm = max(im.shape[1] for im in imgs) + 1
        wm = max(im.shape[2] for im in imgs) + 1
        out = torch.zeros(len(imgs), 3, hm, wm, dtype=torch.uint8, device=imgs[0].device)
        for k, im in enumerate(imgs):
            h, w = im.shape[1:]
            out[k, :, :h, :w] = im
            out[k, :, :h, w] = im[:, :, w - 1]
            out[k, :, h, :w + 1] = out[k, :, h - 1, :w + 1]
        return out.float()

    def _crop_all(self, imgs: list, crop: torch.Tensor, flip: torch.Tensor, parts: list) -> list:
        """For each (views, size) in ``parts``: (len(views)·B, 3, size, size) in [0, 1], view-major rows
        (row v·B + b), flipped where drawn. Each size group of images is padded once and cropped for every
        crop size with one ``roi_align`` call (only one padded group is alive at a time)."""
        B = len(imgs)
        outs, boxes = [], []
        for views, size in parts:
            outs.append(torch.empty(len(views) * B, 3, size, size, device=self.device))
            box = crop[:, views.start:views.stop].clone()
            box[..., 2:] += box[..., :2]  # (left, top, right, bottom) in pixels
            boxes.append(box.float().to(self.device))
        for grp in self._groups([tuple(im.shape[1:]) for im in imgs]):
            padded = self._pad([imgs[i] for i in grp])
            for (views, size), out, box in zip(parts, outs, boxes):
                nv = len(views)
                res = roi_align(padded, [box[i] for i in grp], (size, size), spatial_scale=1.0, sampling_ratio=-1,
                                aligned=True)  # (len(grp)·nv, 3, s, s), image-major
                rows = (torch.arange(nv).view(1, nv) * B + torch.tensor(grp).view(-1, 1)).reshape(-1)
                out.index_copy_(0, rows.to(self.device), res)
            del padded
        for i, ((views, _), out) in enumerate(zip(parts, outs)):
            out.div_(255.0)
            fl = flip[:, views.start:views.stop].t().reshape(-1).to(self.device)
            outs[i] = torch.where(fl.view(-1, 1, 1, 1), out.flip(-1), out)
        return outs

    # ---- photometric ----
    def _subset(self, x: torch.Tensor, sel: torch.Tensor, fn, *args) -> None:
        idx = sel.nonzero().squeeze(1)  # CPU: no device sync
        if idx.numel():
            di = idx.to(self.device)
            x.index_copy_(0, di, fn(x.index_select(0, di), *[a[idx].to(self.device) for a in args]))

    def _photometric(self, x: torch.Tensor, p: dict, views: range) -> torch.Tensor:
        def flat(t):  # (B, V, ...) → view-major rows of these views
            t = t[:, views.start:views.stop]
            return t.transpose(0, 1).reshape(-1, *t.shape[2:])
        jit, order, fac = flat(p["jitter"]), flat(p["order"]), flat(p["factors"])
        for k in range(4):  # ColorJitter: the 4 operations in the view's random order
            for op in range(4):
                self._subset(x, jit & (order[:, k] == op), gpu_ops.JITTER_OPS[op], fac[:, op])
        self._subset(x, flat(p["gray"]), lambda t: gpu_ops.grayscale(t).expand(-1, 3, -1, -1))
        max_sigma, threshold = self.recipe.blur_sigma[1], self.recipe.solarize_threshold / 255
        self._subset(x, flat(p["blur"]), lambda t, s: gpu_ops.gaussian_blur(t, s, max_sigma), flat(p["sigma"]))
        self._subset(x, flat(p["solarize"]), lambda t: gpu_ops.solarize(t, threshold))
        return x

    def __call__(self, encoded: Sequence, generator: torch.Generator | None = None,
                 return_params: bool = False) -> dict:
        decoded = decode_images(encoded, self.device, self.stats)
        kept = [i for i, im in enumerate(decoded) if im is not None]
        imgs = [decoded[i] for i in kept]
        B, V, ng = len(imgs), self.n_views, self.n_global
        sizes_hw = torch.tensor([list(im.shape[1:]) for im in imgs], dtype=torch.long).view(B, 2)
        p = self.draw_params(sizes_hw, generator)
        crops = []
        if B:
            parts = [(vs, sz) for vs, sz in ((range(ng), self.global_size), (range(ng, V), self.local_size))
                     if len(vs)]
            for (views, size), x in zip(parts, self._crop_all(imgs, p["crop"], p["flip"], parts)):
                if self.photometric:
                    x = self._photometric(x, p, views)
                x = (x - self.mean) / self.std
                crops += list(x.view(len(views), B, 3, size, size).unbind(0))
        else:
            crops = [torch.zeros(0, 3, s, s, device=self.device) for s in self.sizes()]
        c = p["crop"]
        hw = sizes_hw.double().view(B, 1, 2).flip(-1)  # (W, H)
        boxes = torch.cat([c[..., :2] / hw, (c[..., :2] + c[..., 2:]) / hw], -1).float()
        out = {"crops": crops, "boxes": boxes.to(self.device), "flips": p["flip"].to(self.device),
               "kept": torch.tensor(kept, dtype=torch.long)}
        if return_params:  # the drawn parameters (CPU, (B, V, ...)), for tests and statistics
            out["params"] = p
        return out
