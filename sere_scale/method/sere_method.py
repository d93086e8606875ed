"""The SERE method: given a batch, the student and the teacher, return a dict of losses.

Knows nothing of the engine (DDP/FSDP/DeepSpeed): ``student`` and ``teacher`` are callables with
``SERENet``'s signature, possibly wrapped.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from sere_scale.losses import ChannelRelationLoss, DINOLoss, IBOTPatchLoss, SpatialRelationLoss
from sere_scale.losses.koleo import koleo_loss
from sere_scale.losses.mocov3 import MoCoV3Loss
from sere_scale.losses.sere import tokens_to_map


def _no_timer(name: str):
    return contextlib.nullcontext()


class SEREMethod(nn.Module):
    def __init__(self, cfg, num_heads: int):
        super().__init__()
        self.timer = _no_timer  # the profiler swaps in a region timer (teacher/student forward, losses)
        il, s = cfg.image_loss, cfg.sere
        self.n_global = cfg.data.n_global
        self.kind = il.kind
        self.out_dim = il.out_dim
        self.w_image, self.alpha, self.beta = s.w_image, s.alpha, s.beta
        self.patch_weight = il.patch_weight
        guard = (il.centering, il.sinkhorn_iterations)
        self.dino = DINOLoss(il.out_dim, il.student_temp, il.center_momentum, *guard) \
            if il.kind in ("dino", "ibot") else None
        self.ibot = IBOTPatchLoss(il.out_dim, il.student_temp, il.center_momentum, *guard) \
            if il.kind == "ibot" else None
        self.koleo_weight = il.koleo_weight
        self.mocov3 = MoCoV3Loss(il.moco_temp) if il.kind == "mocov3" else None
        self.spatial = SpatialRelationLoss(s.heads or num_heads, s.spatial_size_global, s.spatial_size_local,
                                           s.tau_p, s.student_tau_p, s.relation_impl)
        self.channel = ChannelRelationLoss(s.tau_c, s.student_tau_c, s.relation_impl)

    @staticmethod
    def _views(x: torch.Tensor, n: int) -> list[torch.Tensor]:
        return list(x.chunk(n)) if n > 0 else []

    def forward(self, student, teacher, batch: dict, sched: dict) -> dict:
        ng = self.n_global
        crops = batch["crops"]
        nl = len(crops) - ng
        g = torch.cat(crops[:ng])
        loc = torch.cat(crops[ng:]) if nl > 0 else None
        masks = None
        if self.ibot is not None:
            m = batch["masks"]  # (B, n_g, h, w) → view-major (n_g·B, h, w)
            masks = m.transpose(0, 1).reshape(-1, *m.shape[2:])
        with torch.no_grad(), self.timer("teacher_forward"):
            t_out = teacher(g, None, None, predict=False)["global"]
        with self.timer("student_forward"):
            s_all = student(g, loc, masks, predict=True)
        with self.timer("losses"):
            return self._losses(batch, t_out, s_all, masks, sched, ng, nl)

    def _losses(self, batch, t_out, s_all, masks, sched, ng, nl) -> dict:
        s_g, s_l = s_all["global"], s_all["local"]
        g_device = t_out["cls"].device
        out = {}

        # ---- image-level loss L_I
        loss_image = torch.zeros((), device=g_device)
        if self.dino is not None:
            s_cls = self._views(s_g["cls_logits"], ng) + (self._views(s_l["cls_logits"], nl) if nl else [])
            t_cls = self._views(t_out["cls_logits"], ng)
            loss_cls, stats = self.dino(s_cls, t_cls, sched["teacher_temp"])
            loss_image = loss_cls
            out["teacher_entropy"] = stats["teacher_entropy"]
            if self.ibot is not None:
                loss_patch = self.ibot(self._views(s_g["patch_logits"], ng), self._views(t_out["patch_logits"], ng),
                                       self._views(masks.flatten(1), ng), sched["teacher_patch_temp"])
                out["loss_cls"], out["loss_patch"] = loss_cls.detach(), loss_patch.detach()
                loss_image = loss_cls + self.patch_weight * loss_patch
            out["loss_image_norm"] = (loss_cls.detach() / math.log(self.out_dim))
        if self.mocov3 is not None:  # queries of every student view, keys of the teacher's globals
            q = self._views(s_g["cls_logits"], ng) + (self._views(s_l["cls_logits"], nl) if nl else [])
            loss_image, stats = self.mocov3(q, self._views(t_out["cls_logits"], ng))
            out["moco_acc"], out["loss_image_norm"] = stats["acc"], stats["loss_norm"]

        # ---- SERE spatial and channel relations
        grid_g = s_g["grid"]
        t_sp = [tokens_to_map(x, t_out["grid"]) for x in self._views(t_out["spatial"], ng)]
        s_sp = [tokens_to_map(x, grid_g) for x in self._views(s_g["spatial"], ng)]
        s_ch = self._views(s_g["channel"], ng)
        if nl:
            s_sp += [tokens_to_map(x, s_l["grid"]) for x in self._views(s_l["spatial"], nl)]
            s_ch += self._views(s_l["channel"], nl)
        loss_spatial, sp_stats = self.spatial(t_sp, s_sp, batch["boxes"], batch["flips"], ng)
        loss_channel = self.channel(self._views(t_out["channel"], ng), s_ch)

        loss = self.w_image * loss_image + self.alpha * loss_spatial + self.beta * loss_channel
        if self.koleo_weight > 0:  # dinov2: the sum over the global views of KoLeo on the backbone's CLS
            loss_koleo = sum(koleo_loss(c) for c in self._views(s_g["cls"], ng))
            loss = loss + self.koleo_weight * loss_koleo
            out["loss_koleo"] = loss_koleo.detach()
        with torch.no_grad():
            f = F.normalize(s_g["cls"].float(), dim=-1)
            out["feature_std"] = f.std(0).mean() * math.sqrt(f.shape[1])
        out.update(loss=loss, loss_image=loss_image.detach(), loss_spatial=loss_spatial.detach(),
                   loss_channel=loss_channel.detach(), overlap_frac=sp_stats["overlap_frac"])
        return out

    @torch.no_grad()
    def after_step(self) -> None:
        """Once per optimiser step: advance the teacher centers (all-reduced across ranks)."""
        for m in (self.dino, self.ibot):
            if m is not None:
                m.update_center()

    def discard_pending(self) -> None:
        """Forget the teacher statistics of a skipped (non-finite) step."""
        for m in (self.dino, self.ibot):
            if m is not None:
                m.discard_pending()
