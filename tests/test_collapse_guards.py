"""The collapse guards (issue 27): Sinkhorn-Knopp teacher targets and the KoLeo regulariser, against float64
re-derivations written from the published algorithms (SwAV's Sinkhorn-Knopp as dinov2 applies it; KoLeo's
nearest-neighbour log-distance), on one process and across 2 gloo ranks, and wired into the method's loss."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from sere_scale.losses.dino import DINOLoss
from sere_scale.losses.ibot import IBOTPatchLoss
from sere_scale.losses.koleo import koleo_loss
from sere_scale.losses.sinkhorn import sinkhorn_knopp
from tests.conftest import ROOT, subprocess_env
from tests.tiny import tiny_config


def sk64(logits, temp, iters):
    """The published loop in float64: Q = exp(L/T)ᵀ (K×B) normalised to total 1; per iteration rows / row sums / K,
    columns / column sums / B; returned ×B, transposed back (B×K)."""
    q = np.exp(np.asarray(logits, dtype=np.float64) / temp).T
    k, b = q.shape
    q = q / q.sum()
    for _ in range(iters):
        q = q / q.sum(axis=1, keepdims=True) / k
        q = q / q.sum(axis=0, keepdims=True) / b
    return (q * b).T


def koleo64(x, eps=1e-8):
    x = np.asarray(x, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)
    total = 0.0
    for i in range(len(x)):
        j = max((j for j in range(len(x)) if j != i), key=lambda j: x[i] @ x[j])
        total += -math.log(np.linalg.norm(x[i] - x[j] + eps) + eps)
    return total / len(x)


def test_sinkhorn_equals_the_published_loop():
    g = torch.Generator().manual_seed(1)
    for b, k, temp, iters in ((6, 5, 0.1, 3), (9, 16, 0.04, 1), (4, 3, 1.0, 10)):
        x = torch.randn(b, k, generator=g)
        np.testing.assert_allclose(sinkhorn_knopp(x, temp, iters).double().numpy(), sk64(x, temp, iters),
                                   rtol=2e-5, atol=1e-7)


def test_sinkhorn_balances_prototypes_and_never_overflows():
    """Converged: each sample a distribution, each prototype 1/K of the batch. Logits far beyond exp's float32
    range (norm_last_layer: false) give the same finite targets as the shifted ones (the shift cancels)."""
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(2))
    q = sinkhorn_knopp(x, 0.5, 200).double()
    np.testing.assert_allclose(q.sum(1).numpy(), np.ones(12), atol=1e-6)
    np.testing.assert_allclose(q.sum(0).numpy(), np.full(4, 12 / 4), atol=1e-4)
    big = sinkhorn_knopp(x + 50.0, 0.04, 3)
    assert torch.isfinite(big).all()
    np.testing.assert_allclose(big.double().numpy(), sk64(x, 0.04, 3), rtol=1e-4, atol=1e-6)


def test_sinkhorn_across_two_ranks_equals_one_process(tmp_path):
    """Each rank's rows of the 2-rank result equal the float64 loop over the whole matrix (sums all-reduced)."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist" / "sinkhorn_ranks.py"), str(out)]
    res = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 7, generator=g, dtype=torch.float64)
    ref = sk64(logits.float().double(), 0.5, 3)
    for rank in range(2):
        got = np.array(json.loads((out / f"rank{rank}.json").read_text()))
        np.testing.assert_allclose(got, ref[rank * 5:(rank + 1) * 5], rtol=2e-5, atol=1e-7)


def _ce64(p_t, s_logits, t_s):
    s = np.asarray(s_logits, dtype=np.float64) / t_s
    logp = s - s.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return -(p_t * logp).sum(-1)


def test_dino_loss_with_sinkhorn_targets():
    """Targets from one Sinkhorn-Knopp over both global views together; CE over pairs (q, v ≠ q); no center."""
    g = torch.Generator().manual_seed(3)
    t = [torch.randn(4, 6, generator=g) for _ in range(2)]
    s = [torch.randn(4, 6, generator=g) for _ in range(3)]
    loss_fn = DINOLoss(6, 0.1, 0.9, "sinkhorn_knopp", 3)
    loss, _ = loss_fn(s, t, 0.05)
    pt = sk64(torch.cat(t), 0.05, 3)
    pts = [pt[:4], pt[4:]]
    ref = np.mean([_ce64(pts[q], s[v], 0.1).mean() for q in range(2) for v in range(3) if v != q])
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    loss_fn.update_center()
    assert torch.equal(loss_fn.center, torch.zeros(1, 6))  # Sinkhorn-Knopp keeps no running center


def test_ibot_loss_with_sinkhorn_over_masked_patches_only():
    """Sinkhorn-Knopp runs over the masked patches of both views together; unmasked ones are not scored."""
    g = torch.Generator().manual_seed(4)
    B, N, K = 3, 5, 4
    t = [torch.randn(B, N, K, generator=g) for _ in range(2)]
    s = [torch.randn(B, N, K, generator=g) for _ in range(2)]
    m = [torch.rand(B, N, generator=g) < 0.5 for _ in range(2)]
    m[0][0] = False  # an image without a masked patch scores 0
    m[1][2, 1] = True
    loss = IBOTPatchLoss(K, 0.1, 0.9, "sinkhorn_knopp", 3)(s, t, m, 0.07).item()
    rows = sk64(torch.cat([t[v][m[v]] for v in range(2)]), 0.07, 3)
    ref, start = 0.0, 0
    for v in range(2):
        per_image = []
        for b in range(B):
            idx = [n for n in range(N) if m[v][b, n]]
            ce = [_ce64(rows[start + i], s[v][b, n], 0.1) for i, n in enumerate(idx)]
            start += len(idx)
            per_image.append(np.mean(ce) if ce else 0.0)
        ref += np.mean(per_image)
    assert loss == pytest.approx(ref / 2, rel=1e-5)


def test_koleo_equals_the_nearest_neighbour_log_distance():
    g = torch.Generator().manual_seed(5)
    for b, d in ((2, 3), (7, 5), (16, 8)):
        x = torch.randn(b, d, generator=g)
        assert koleo_loss(x).item() == pytest.approx(koleo64(x), rel=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        koleo_loss(torch.randn(1, 4))


def test_koleo_gradient_spreads_a_clustered_batch():
    """A step against KoLeo's gradient moves the closest pair of a tight cluster apart."""
    x = (torch.ones(6, 4) + 0.01 * torch.randn(6, 4, generator=torch.Generator().manual_seed(6))).requires_grad_()
    before = koleo64(x.detach())
    koleo_loss(x).backward()
    with torch.no_grad():
        y = x - 0.05 * x.grad / x.grad.norm()
    assert koleo64(y) < before


def test_method_adds_weighted_koleo_of_the_global_cls(tmp_path, digits_root):
    """loss(koleo_weight=w) − loss(w=0) = w · Σ_global views KoLeo(student backbone CLS), same weights, same batch."""
    from sere_scale.data.loader import build_train_loader
    from sere_scale.method.sere_method import SEREMethod
    from sere_scale.models.network import build_student_teacher
    outs = {}
    for w in (0.0, 0.3):
        cfg = tiny_config(tmp_path / str(w), digits_root / "train", "data.batch_size=4", "model.drop_path=0",
                          f"image_loss.koleo_weight={w}", "image_loss.centering=sinkhorn_knopp")
        torch.manual_seed(0)
        student, teacher = build_student_teacher(cfg)
        batch = next(build_train_loader(cfg, 0, 1).epoch_iter(0, 0))
        method = SEREMethod(cfg, student.backbone.num_heads)
        outs[w] = method(student, teacher, batch, {"teacher_temp": 0.04, "teacher_patch_temp": 0.04})
        if w:
            m = batch["masks"]  # the student sees the iBOT-masked globals, view-major as in the method
            with torch.no_grad():
                cls = student(torch.cat(batch["crops"][:cfg.data.n_global]), None,
                              m.transpose(0, 1).reshape(-1, *m.shape[2:]), predict=False)["global"]["cls"]
            ref = sum(koleo64(c) for c in cls.chunk(cfg.data.n_global))
    assert outs[0.3]["loss_koleo"].item() == pytest.approx(ref, rel=1e-4)
    assert (outs[0.3]["loss"] - outs[0.0]["loss"]).item() == pytest.approx(0.3 * ref, rel=1e-3)


def test_guard_keys_are_checked(tmp_path):
    from sere_scale.config.load import load_config
    from sere_scale.config.schema import ConfigError
    for bad, key in (("image_loss.koleo_weight=-1", "koleo_weight"), ("image_loss.sinkhorn_iterations=0",
                                                                       "sinkhorn_iterations"),
                     ("image_loss.centering=sinkhorn", "centering")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, [bad])


def test_dino_head_with_batchnorm_follows_dinos_layout():
    """``head_bn``: Linear → BN → GELU → Linear → BN → GELU → Linear → L2 → weight-normalised prototypes, BN in
    training mode over every token of the batch (iBOT's (B, N, C) tokens together), against float64 formulas."""
    from sere_scale.models.heads import DINOHead
    torch.manual_seed(0)
    head = DINOHead(6, 10, hidden_dim=8, bottleneck_dim=4, norm_last_layer=True, use_bn=True).train()
    kinds = [type(m).__name__ for m in head.mlp]
    assert kinds == ["Linear", "SyncTokenBatchNorm", "GELU", "Linear", "SyncTokenBatchNorm", "GELU", "Linear"]
    x = torch.randn(3, 5, 6)
    got = head(x).double()
    p = {k: v.detach().double() for k, v in head.state_dict().items()}

    def bn(h, i):
        flat = h.reshape(-1, h.shape[-1])
        mu, var = flat.mean(0), flat.var(0, unbiased=False)
        return (h - mu) / torch.sqrt(var + 1e-5) * p[f"mlp.{i}.weight"] + p[f"mlp.{i}.bias"]

    def gelu(h):
        return 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))

    h = x.double() @ p["mlp.0.weight"].T + p["mlp.0.bias"]
    h = gelu(bn(h, 1)) @ p["mlp.3.weight"].T + p["mlp.3.bias"]
    h = gelu(bn(h, 4)) @ p["mlp.6.weight"].T + p["mlp.6.bias"]
    z = h / h.norm(dim=-1, keepdim=True)
    w = p["last_layer.weight_v"] / p["last_layer.weight_v"].norm(dim=1, keepdim=True)
    torch.testing.assert_close(got, z @ w.T, rtol=1e-4, atol=1e-5)
    plain = DINOHead(6, 10, hidden_dim=8, bottleneck_dim=4, use_bn=False)
    assert [type(m).__name__ for m in plain.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
