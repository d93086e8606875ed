"""MoCo v3 as L_I: the loss against a float64 loop, the heads, gradients of every student parameter, the
key gather across 2 ranks, and a MoCo v3 + SERE training run."""
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from sere_scale.losses.mocov3 import MoCoV3Loss, contrastive_loss, gather_keys
from sere_scale.run.metrics import read_metrics
from sere_scale.models.heads import SyncTokenBatchNorm
from sere_scale.models.mocov3_heads import MoCoV3Head
from tests.conftest import ROOT, subprocess_env
from tests.tiny import tiny_config

MOCO = ["image_loss.kind=mocov3", "image_loss.moco_hidden_dim=32", "image_loss.moco_out_dim=16"]


def ctr64(q, k_bank, pos, T):
    """Float64 InfoNCE written out: for each query i, -log(exp(s_i,pos_i) / sum_j exp(s_ij)), s = cos / T;
    mean over queries, times 2T."""
    total = 0.0
    for i in range(q.shape[0]):
        qi = q[i].double() / q[i].double().norm()
        sims = [float(qi @ (k / k.norm())) / T for k in k_bank.double()]
        m = max(sims)
        lse = m + math.log(sum(math.exp(s - m) for s in sims))
        total += lse - sims[pos[i]]
    return total / q.shape[0] * 2 * T


def test_symmetric_loss_of_two_views_matches_float64_loop():
    torch.manual_seed(0)
    B, D, T = 5, 7, 0.2
    q = [torch.randn(B, D) for _ in range(2)]
    k = [torch.randn(B, D) for _ in range(2)]
    got, stats = MoCoV3Loss(T)(q, k)
    own = list(range(B))
    ref = ctr64(q[0], k[1], own, T) + ctr64(q[1], k[0], own, T)
    assert math.isclose(got.item(), ref, rel_tol=1e-5)
    assert math.isclose(stats["loss_norm"].item(), ref / 2 / (2 * T) / math.log(B), rel_tol=1e-5)


def test_local_views_are_contrasted_with_every_teacher_global():
    torch.manual_seed(1)
    B, D, T = 4, 6, 0.2
    q = [torch.randn(B, D) * 3 for _ in range(4)]  # 2 globals + 2 locals
    k = [torch.randn(B, D) for _ in range(2)]
    got, _ = MoCoV3Loss(T)(q, k)
    own = list(range(B))
    pairs = [ctr64(q[v], k[g], own, T) for g in range(2) for v in range(4) if v != g]
    assert len(pairs) == 6
    assert math.isclose(got.item(), 2 * sum(pairs) / len(pairs), rel_tol=1e-5)


def test_label_offset_picks_this_ranks_keys_in_a_gathered_bank():
    """Rank r of 3 holds queries whose positives sit at r·B + i of the gathered keys."""
    torch.manual_seed(2)
    B, D, T, world = 4, 8, 0.2, 3
    bank = torch.nn.functional.normalize(torch.randn(world * B, D), dim=1)
    for rank in range(world):
        q = bank[rank * B:(rank + 1) * B] + 0.05 * torch.randn(B, D)
        got, acc = contrastive_loss(q, bank, rank * B, T)
        ref = ctr64(q, bank, [rank * B + i for i in range(B)], T)
        assert math.isclose(got.item(), ref, rel_tol=1e-5)
        assert acc.item() == 1.0  # noisy copies of their own keys: the positives win
        wrong, _ = contrastive_loss(q, bank, ((rank + 1) % world) * B, T)
        assert wrong.item() > 3 * got.item()  # the offset matters
    k, off = gather_keys(bank[:B])  # one process: the keys themselves, offset 0
    assert off == 0 and torch.equal(k, bank[:B])


def test_gradient_flows_into_queries_only():
    torch.manual_seed(3)
    q = [torch.randn(3, 4, requires_grad=True) for _ in range(2)]
    k = [torch.randn(3, 4, requires_grad=True) for _ in range(2)]
    MoCoV3Loss(0.2)(q, k)[0].backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in q)
    assert all(x.grad is None for x in k)


def test_head_layout_follows_moco_v3():
    head = MoCoV3Head(12, hidden_dim=20, out_dim=6)
    def kinds(seq):
        return [(type(m).__name__, getattr(m, "out_features", None) or getattr(m, "num_features", None),
                 getattr(m, "affine", None)) for m in seq]
    lin, bn, relu = "Linear", "SyncTokenBatchNorm", ("ReLU", None, None)
    assert kinds(head.projector) == [(lin, 20, None), (bn, 20, True), relu, (lin, 20, None), (bn, 20, True), relu,
                                     (lin, 6, None), (bn, 6, False)]
    assert kinds(head.predictor) == [(lin, 20, None), (bn, 20, True), relu, (lin, 6, None), (bn, 6, False)]
    assert all(m.bias is None for m in head.modules() if isinstance(m, nn.Linear))
    assert all(isinstance(m, SyncTokenBatchNorm) for m in head.modules() if isinstance(m, nn.BatchNorm1d))
    x = torch.randn(10, 12)
    assert torch.equal(head(x, predict=False), head.projector(x))
    assert torch.equal(head(x, predict=True), head.predictor(head.projector(x)))


def _batch(cfg):
    from sere_scale.data.loader import build_train_loader
    return next(build_train_loader(cfg, 0, 1).epoch_iter(0, 0))


def test_every_student_parameter_gets_a_gradient(tmp_path, digits_root):
    """DDP runs with find_unused_parameters=False: MoCo v3 + SERE must reach every trainable parameter."""
    from sere_scale.method.sere_method import SEREMethod
    from sere_scale.models.network import build_student_teacher
    cfg = tiny_config(tmp_path, digits_root / "train", *MOCO, "data.batch_size=4")
    torch.manual_seed(0)
    student, teacher = build_student_teacher(cfg)
    method = SEREMethod(cfg, student.backbone.num_heads)
    out = method(student, teacher, _batch(cfg), {"teacher_temp": 0.04, "teacher_patch_temp": 0.04})
    out["loss"].backward()
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    assert any(n.startswith("image_head.predictor") for n in names)
    no_grad = [n for n, p in student.named_parameters() if p.requires_grad and
               (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)]
    assert no_grad == []
    assert all(p.grad is None for p in teacher.parameters())
    assert out["loss"].item() == pytest.approx(cfg.sere.w_image * out["loss_image"].item()
                                               + cfg.sere.alpha * out["loss_spatial"].item()
                                               + cfg.sere.beta * out["loss_channel"].item(), rel=1e-5)


def test_mocov3_sere_training_run(tmp_path, digits_root):
    from sere_scale.run.train import train
    cfg = tiny_config(tmp_path / "run", digits_root / "train", *MOCO, "train.max_steps=3", "sere.w_image=1.0")
    assert train(cfg)["step"] == 3
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in ("loss", "loss_image", "loss_spatial", "loss_channel", "moco_acc", "loss_image_norm",
                    "grad_norm"):
            assert math.isfinite(r[key]), key
        assert r["loss_image"] > 0 and 0 <= r["moco_acc"] <= 1
        assert r["loss"] == pytest.approx(r["loss_image"] + 0.2 * r["loss_spatial"] + 0.5 * r["loss_channel"],
                                          rel=1e-5)
    sd = torch.load(next((tmp_path / "run" / "checkpoints").glob("step_*")) / "model.pt", weights_only=False)
    assert any(k.startswith("image_head.projector") for k in sd["teacher"])


def test_keys_are_gathered_across_two_ranks(tmp_path):
    """torchrun, 2 ranks (gloo): each rank's loss equals the float64 loop over its queries against the keys of
    both ranks, the positive of query i on rank r at r·B + i."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist" / "mocov3_gather.py"), str(out)]
    res = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    B, D, T = 3, 5, 0.2
    g = torch.Generator().manual_seed(0)
    q = [[torch.randn(B, D, generator=g) for _ in range(2)] for _ in range(2)]  # [rank][view]
    k = [[torch.randn(B, D, generator=g) for _ in range(2)] for _ in range(2)]
    for rank in range(2):
        got = json.loads((out / f"rank{rank}.json").read_text())["loss"]
        pos = [rank * B + i for i in range(B)]
        ref = (ctr64(q[rank][0], torch.cat([k[0][1], k[1][1]]), pos, T)
               + ctr64(q[rank][1], torch.cat([k[0][0], k[1][0]]), pos, T))
        assert math.isclose(got, ref, rel_tol=1e-5), (rank, got, ref)


def test_preset_loads_with_moco_v3_settings():
    from sere_scale.config.load import load_config
    cfg = load_config(ROOT / "configs" / "mocov3_sere_vit_s16.yaml")
    il = cfg.image_loss
    assert (il.kind, il.moco_hidden_dim, il.moco_out_dim, il.moco_temp) == ("mocov3", 4096, 256, 0.2)
    assert cfg.data.n_global == 2 and cfg.model.arch == "vit_small_patch16_224"
