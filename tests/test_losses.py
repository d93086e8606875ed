"""Loss modules against float64 re-derivations written out element by element."""
import math

import torch

from sere_scale.geometry.boxes import overlap_boxes, region_aligned_sample
from sere_scale.losses import ChannelRelationLoss, DINOLoss, IBOTPatchLoss, SpatialRelationLoss


def softmax64(x):
    x = x.double()
    e = (x - x.max()).exp()
    return e / e.sum()


def test_dino_loss_pairs_temperatures_and_center():
    torch.manual_seed(0)
    B, K, V = 3, 7, 4
    s = [torch.randn(B, K) * 3 for _ in range(V)]
    t = [torch.randn(B, K) * 3 for _ in range(2)]
    loss_fn = DINOLoss(K, student_temp=0.1, center_momentum=0.9)
    c0 = torch.randn(1, K)
    loss_fn.center.copy_(c0)
    got, stats = loss_fn(s, t, teacher_temp=0.05)
    total, n = 0.0, 0
    for q in range(2):
        for v in range(V):
            if v == q:
                continue
            for b in range(B):
                pt = softmax64((t[q][b].double() - c0[0].double()) / 0.05)
                ls = softmax64(s[v][b].double() / 0.1).log()
                total += -(pt * ls).sum().item() / B
            n += 1
    assert math.isclose(got.item(), total / n, rel_tol=1e-5)
    # the center moves once, on update_center, to the momentum average of the teacher batch mean
    assert torch.equal(loss_fn.center, c0)
    loss_fn.update_center()
    expected = 0.9 * c0.double() + 0.1 * torch.cat(t).double().mean(0, keepdim=True)
    assert torch.allclose(loss_fn.center.double(), expected, atol=1e-6)


def test_center_accumulates_over_micro_batches():
    torch.manual_seed(1)
    K = 5
    fn = DINOLoss(K, center_momentum=0.5)
    chunks = [torch.randn(4, K), torch.randn(6, K)]
    for c in chunks:
        fn([c, c, c], [c, c], 0.04)
    fn.update_center()
    mean = torch.cat([torch.cat([c, c]) for c in chunks]).mean(0, keepdim=True)
    assert torch.allclose(fn.center, 0.5 * mean, atol=1e-6)


def test_ibot_patch_loss_on_masked_patches_only():
    torch.manual_seed(2)
    B, N, K = 2, 6, 5
    s = [torch.randn(B, N, K) for _ in range(2)]
    t = [torch.randn(B, N, K) for _ in range(2)]
    m = [torch.tensor([[1, 0, 1, 0, 0, 1], [0] * 6], dtype=torch.bool),
         torch.tensor([[1] * 6, [0, 0, 0, 0, 0, 1]], dtype=torch.bool)]
    fn = IBOTPatchLoss(K, student_temp=0.1)
    got = fn(s, t, m, teacher_temp=0.07)
    views = []
    for q in range(2):
        per_img = []
        for b in range(B):
            idx = m[q][b].nonzero().flatten().tolist()
            ces = [-(softmax64(t[q][b, i] / 0.07) * softmax64(s[q][b, i] / 0.1).log()).sum().item() for i in idx]
            per_img.append(sum(ces) / len(ces) if ces else 0.0)
        views.append(sum(per_img) / B)
    assert math.isclose(got.item(), sum(views) / 2, rel_tol=1e-5)


def relation_ce64(xs, xt, ss, ts):
    """Mean over rows of CE(softmax(ts·xt xtᵀ) row, softmax(ss·xs xsᵀ) row) for one (R, D) group, float64."""
    xs, xt = xs.double(), xt.double()
    ls = torch.log_softmax(ss * xs @ xs.T, dim=-1)
    pt = torch.softmax(ts * xt @ xt.T, dim=-1)
    return -(pt * ls).sum(-1).mean().item()


def test_spatial_loss_excludes_non_overlapping_pairs():
    torch.manual_seed(3)
    B, C, M, Sg, Sl = 2, 8, 2, 3, 2
    d = C // M
    boxes = torch.tensor([
        [[0.0, 0.0, 0.7, 0.7], [0.2, 0.2, 1.0, 1.0], [0.5, 0.5, 0.8, 0.8]],
        [[0.0, 0.0, 0.4, 0.4], [0.6, 0.6, 1.0, 1.0], [0.1, 0.1, 0.3, 0.3]],  # globals disjoint for image 1
    ])
    flips = torch.tensor([[False, True, False], [True, False, True]])
    t_maps = [torch.randn(B, C, 4, 4) for _ in range(2)]
    s_maps = [torch.randn(B, C, 4, 4), torch.randn(B, C, 4, 4), torch.randn(B, C, 2, 2)]
    fn = SpatialRelationLoss(M, Sg, Sl, teacher_tau=0.5, student_tau=1.0, impl="plain")
    got, stats = fn(t_maps, s_maps, boxes, flips, n_global=2)
    terms = []
    for q in range(2):
        for v in range(3):
            if v == q:
                continue
            S = Sg if v < 2 else Sl
            region, valid = overlap_boxes(boxes[:, q], boxes[:, v])
            ts = region_aligned_sample(t_maps[q].double(), boxes[:, q].double(), flips[:, q], region.double(), S)
            st = region_aligned_sample(s_maps[v].double(), boxes[:, v].double(), flips[:, v], region.double(), S)
            for b in range(B):
                if not valid[b]:
                    continue
                per_head = []
                for m in range(M):
                    xt = ts[b, m * d:(m + 1) * d].reshape(d, S * S).T
                    xs = st[b, m * d:(m + 1) * d].reshape(d, S * S).T
                    per_head.append(relation_ce64(xs, xt, 1 / math.sqrt(d), 1 / (math.sqrt(d) * 0.5)))
                terms.append(sum(per_head) / M)
    assert len(terms) == 5  # image 0: all four pairs; image 1: only (g0, local) overlaps
    assert math.isclose(got.item(), sum(terms) / len(terms), rel_tol=1e-4)


def test_spatial_loss_gradient_reaches_student_only():
    torch.manual_seed(4)
    B, C = 2, 8
    boxes = torch.tensor([[[0, 0, 0.8, 0.8], [0.2, 0.2, 1, 1]]] * B, dtype=torch.float32)
    flips = torch.zeros(B, 2, dtype=torch.bool)
    t = [torch.randn(B, C, 4, 4, requires_grad=True) for _ in range(2)]
    s = [torch.randn(B, C, 4, 4, requires_grad=True) for _ in range(2)]
    loss, _ = SpatialRelationLoss(2, 3, 2, impl="plain")(t, s, boxes, flips, 2)
    loss.backward()
    assert all(x.grad is None for x in t) and all(x.grad.abs().sum() > 0 for x in s)


def test_channel_loss_matches_formula_with_views_of_different_token_counts():
    torch.manual_seed(5)
    B, C = 2, 6
    t = [torch.randn(B, 9, C) for _ in range(2)]
    s = [torch.randn(B, 9, C), torch.randn(B, 9, C), torch.randn(B, 4, C)]
    got = ChannelRelationLoss(teacher_tau=0.1, student_tau=1.0, impl="plain")(t, s)
    pairs = []
    for q in range(2):
        for v in range(3):
            if v == q:
                continue
            per_b = [relation_ce64(s[v][b].T, t[q][b].T, 1 / s[v].shape[1], 1 / (t[q].shape[1] * 0.1))
                     for b in range(B)]
            pairs.append(sum(per_b) / B)
    assert math.isclose(got.item(), sum(pairs) / len(pairs), rel_tol=1e-5)


def _under_autocast_equals_fp32(fn, *inputs):
    """``fn`` on fp16 inputs under fp16 autocast gives the value of ``fn`` on the same inputs in fp32 without
    autocast (to fp32 rounding): whatever it computes stays in fp32. A matmul or softmax left to autocast would
    be off by ~1e-3."""
    from sere_scale.engine.base import cast_floating
    plain = fn(*cast_floating(inputs, torch.float32))
    with torch.autocast("cpu", dtype=torch.float16):
        auto = fn(*inputs)
    assert auto.dtype == torch.float32
    assert math.isclose(float(auto), float(plain), rel_tol=1e-6), (float(auto), float(plain))


def test_losses_keep_softmaxes_logits_and_centers_in_fp32_under_fp16_autocast():
    from sere_scale.losses.mocov3 import MoCoV3Loss
    torch.manual_seed(0)
    h = torch.float16
    s = [torch.randn(6, 32).to(h) * 4 for _ in range(4)]
    t = [torch.randn(6, 32).to(h) * 4 for _ in range(2)]
    _under_autocast_equals_fp32(lambda a, b: DINOLoss(32)(a, b, 0.04)[0], s, t)
    _under_autocast_equals_fp32(lambda a, b: MoCoV3Loss(0.2)(a, b)[0], s, t)
    sp = [torch.randn(6, 5, 32).to(h) * 4 for _ in range(2)]
    tp = [torch.randn(6, 5, 32).to(h) * 4 for _ in range(2)]
    masks = [torch.rand(6, 5) < 0.5 for _ in range(2)]
    _under_autocast_equals_fp32(lambda a, b: IBOTPatchLoss(32)(a, b, masks, 0.04), sp, tp)
    for impl in ("plain", "chunked"):
        _under_autocast_equals_fp32(lambda a, b: ChannelRelationLoss(impl=impl)(b, a), sp, tp)
        maps = [torch.randn(2, 32, 3, 3).to(h) * 4 for _ in range(3)]
        boxes = torch.tensor([[[0.0, 0.0, 0.8, 0.9], [0.1, 0.2, 1.0, 1.0], [0.3, 0.3, 0.7, 0.7]]] * 2)
        flips = torch.tensor([[0, 1, 0], [1, 0, 0]])
        _under_autocast_equals_fp32(
            lambda m: SpatialRelationLoss(4, 3, 2, impl=impl)(m[:2], m, boxes, flips, 2)[0], maps)
    # the centers: accumulated and updated in fp32 under autocast, the same as without
    plain, auto = DINOLoss(32), DINOLoss(32)
    plain(s, t, 0.04)
    with torch.autocast("cpu", dtype=torch.float16):
        auto(s, t, 0.04)
        auto.update_center()
    plain.update_center()
    assert auto.center.dtype == torch.float32 and torch.equal(auto.center, plain.center)


def test_discarded_teacher_statistics_do_not_move_the_center():
    """``discard_pending`` (a skipped step) forgets the accumulated logits; the next update uses only later ones."""
    from sere_scale.losses.centering import CenteredTeacher
    c = CenteredTeacher(3, center_momentum=0.5)
    c.accumulate(torch.tensor([[10.0, 10.0, 10.0]]))
    c.discard_pending()
    c.update_center()
    assert torch.equal(c.center, torch.zeros(1, 3))
    c.accumulate(torch.tensor([[2.0, 4.0, 6.0], [0.0, 0.0, 2.0]]))
    c.discard_pending()
    c.accumulate(torch.tensor([[2.0, 2.0, 2.0]]))
    c.update_center()
    assert torch.equal(c.center, torch.tensor([[1.0, 1.0, 1.0]]))  # 0.5 · 0 + 0.5 · mean of the kept row
