"""The student/teacher network: backbone + image-level head + SERE relation heads (global and local sets)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from sere_scale.models.backbone import ViTBackbone, create_vit
from sere_scale.models.heads import DINOHead, RelationHeads
from sere_scale.models.mocov3_heads import MoCoV3Head
from sere_scale.models.plan import ParallelPlan


class SERENet(nn.Module):
    """``forward(global_crops, local_crops=None, masks=None, predict=True)``.

    ``global_crops`` (n_g·B, 3, Sg, Sg) and ``local_crops`` (n_l·B, 3, Sl, Sl) are view-major (view 0's batch
    first): one forward per crop size. Returns ``{"global": out, "local": out or None}`` where each ``out`` has
    ``cls_logits`` (V·B, K) (MoCo v3: the query (V·B, D), or with ``predict=False`` the key),
    ``patch_logits`` (V·B, N, K) (globals, iBOT only), ``spatial`` and ``channel`` tokens (V·B, N, C) after the
    relation heads, ``cls`` (V·B, C) and ``grid`` (h, w).
    ``predict=False`` (teacher) applies only the projection heads h.
    """

    def __init__(self, backbone: ViTBackbone, image_head: Optional[nn.Module], patch_logits: bool,
                 with_local: bool, share_local_heads: bool):
        super().__init__()
        self.backbone = backbone
        self.image_head = image_head
        self.patch_logits = patch_logits
        C = backbone.embed_dim
        self.rel_global = RelationHeads(C)
        self.rel_local = None
        if with_local and not share_local_heads:
            self.rel_local = RelationHeads(C)

    def parallel_plan(self) -> ParallelPlan:
        """What engines need (``models/plan.py``): the ViT blocks, the heads (image head, relation heads) and
        the DINO/iBOT head's last layer, frozen early (``optim.freeze_last_layer``)."""
        heads = tuple(m for m in (self.image_head, self.rel_global, self.rel_local) if m is not None)
        frozen = ("image_head.last_layer",) if hasattr(self.image_head, "last_layer") else ()

        def set_ac(on: bool) -> None:
            self.backbone.checkpoint_activations = bool(on)

        return ParallelPlan(blocks=tuple(self.backbone.vit.blocks), heads=heads, frozen_early=frozen,
                            set_activation_checkpointing=set_ac)

    def _branch(self, x, heads: RelationHeads, mask, predict: bool, is_global: bool) -> dict:
        f = self.backbone(x, mask)
        out = {"cls": f["cls"], "grid": f["grid"]}
        if self.image_head is not None:
            if is_global and self.patch_logits:
                tokens = torch.cat([f["cls"].unsqueeze(1), f["patch"]], dim=1)
                logits = self.image_head(tokens)
                out["cls_logits"], out["patch_logits"] = logits[:, 0], logits[:, 1:]
            elif getattr(self.image_head, "takes_predict", False):  # MoCo v3: student q, teacher k
                out["cls_logits"] = self.image_head(f["cls"], predict)
            else:
                out["cls_logits"] = self.image_head(f["cls"])
        out["spatial"], out["channel"] = heads(f["pre"], predict)
        return out

    def forward(self, global_crops, local_crops=None, masks=None, predict: bool = True) -> dict:
        out = {"global": self._branch(global_crops, self.rel_global, masks, predict, True), "local": None}
        if local_crops is not None:
            heads = self.rel_global if self.rel_local is None else self.rel_local
            out["local"] = self._branch(local_crops, heads, None, predict, False)
        return out


def build_network(cfg, teacher: bool = False) -> SERENet:
    il = cfg.image_loss
    vit = create_vit(cfg.model, cfg.data.global_size, 0.0 if teacher else cfg.model.drop_path)
    backbone = ViTBackbone(vit, mask_token=(il.kind == "ibot"),
                           checkpoint_activations=cfg.model.checkpoint_activations,
                           dino_pos_embed=cfg.model.dino_vit)
    head = None
    if il.kind in ("dino", "ibot"):
        head = DINOHead(backbone.embed_dim, il.out_dim, il.hidden_dim, il.bottleneck_dim, il.norm_last_layer,
                        il.head_bn)
    elif il.kind == "mocov3":
        head = MoCoV3Head(backbone.embed_dim, il.moco_hidden_dim, il.moco_out_dim)
    return SERENet(backbone, head, patch_logits=(il.kind == "ibot"), with_local=cfg.data.n_local > 0,
                   share_local_heads=cfg.sere.share_local_heads)


def build_student_teacher(cfg) -> tuple[SERENet, SERENet]:
    """Student with drop-path and a teacher that starts as an exact copy (no drop-path, no gradients)."""
    student = build_network(cfg)
    teacher = build_network(cfg, teacher=True)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher
