"""Self-relations of two views against loop references, the flip/box bookkeeping of the pictures, and the
identity of identical views."""
import math

import pytest
import torch
import torch.nn as nn

from sere_scale.geometry.boxes import region_aligned_sample
from sere_scale.viz.figures import _to_view
from sere_scale.eval.relations import (
    ChannelStats,
    channel_relation,
    row_corr_distance,
    row_tv,
    spatial_relation,
    two_view_relations,
)


def test_spatial_relation_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    B, C, S, M, tau = 2, 12, 3, 3, 0.5
    x = torch.randn(B, C, S, S, generator=g, dtype=torch.float64)
    A = spatial_relation(x, M, tau)
    d = C // M
    for b in range(B):
        for m in range(M):
            feats = [[float(x[b, m * d + k, p // S, p % S]) for k in range(d)] for p in range(S * S)]
            for i in range(S * S):
                logits = [sum(a * c for a, c in zip(feats[i], feats[j])) / math.sqrt(d) / tau
                          for j in range(S * S)]
                z = sum(math.exp(v) for v in logits)
                for j in range(S * S):
                    assert A[b, m, i, j].item() == pytest.approx(math.exp(logits[j]) / z, rel=1e-9)


def test_channel_relation_matches_loop_reference():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)  # (B, N, C)
    A = channel_relation(t, 0.1)
    for b in range(2):
        for i in range(4):
            logits = [sum(t[b, n, i].item() * t[b, n, j].item() for n in range(5)) / 5 / 0.1
                      for j in range(4)]
            z = sum(math.exp(v) for v in logits)
            for j in range(4):
                assert A[b, i, j].item() == pytest.approx(math.exp(logits[j]) / z, rel=1e-9)


def test_row_corr_distance_matches_pearson_and_ignores_temperature():
    import numpy as np
    g = torch.Generator().manual_seed(2)
    a, b = (torch.randn(3, 2, 5, 5, generator=g, dtype=torch.float64) for _ in range(2))
    d = row_corr_distance(a, b)
    assert d.shape == (3, 2, 5) and d.dtype == torch.float64
    for idx in np.ndindex(3, 2, 5):
        keep = [j for j in range(5) if j != idx[2]]  # the diagonal entry is left out
        r = np.corrcoef(a[idx].double().numpy()[keep], b[idx].double().numpy()[keep])[0, 1]
        assert d[idx].item() == pytest.approx(1 - r, abs=1e-9)
    # a positive scale (a softmax temperature) and an offset per row change nothing; a sign flip is maximal
    torch.testing.assert_close(row_corr_distance(3.0 * a + 1.5, 0.2 * b - 4.0), d, rtol=0, atol=1e-9)
    assert torch.all(row_corr_distance(a, a) == 0)
    torch.testing.assert_close(row_corr_distance(a, -a), torch.full_like(d, 2.0), rtol=0, atol=1e-9)
    # changing the diagonal alone changes nothing; flat rows: equal → 0, against a varying row → 1
    assert torch.equal(row_corr_distance(a + 9.0 * torch.eye(5), b), d)
    flat = torch.zeros(1, 4, 4)
    assert row_corr_distance(flat, flat).tolist() == [[0.0] * 4]
    assert row_corr_distance(flat, torch.randn(1, 4, 4, generator=g)).min() > 0.99
    assert torch.equal(row_corr_distance(torch.randn(1, 2, 2), torch.randn(1, 2, 2)), torch.zeros(1, 2,
                                                                                                 dtype=torch.float64))


def test_row_tv_and_channel_stats():
    a = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    b = torch.tensor([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    assert row_tv(a, b).tolist() == [1.0, 0.0]
    x = torch.randn(3, 7, 5, dtype=torch.float64)
    acc = ChannelStats()
    acc.update(x[:1])
    acc.update(x[1:])
    mean, std = acc.mean_std(eps=0.0)
    flat = x.reshape(-1, 5)
    torch.testing.assert_close(mean, flat.mean(0).float())
    torch.testing.assert_close(std, flat.std(0, unbiased=False).float())


@pytest.mark.parametrize("flip", [False, True])
def test_picture_mapping_agrees_with_region_sampling(flip):
    """A point of the overlap region drawn in a view (``_to_view``) is where region_aligned_sample reads it: a
    feature map holding each cell's own view coordinates samples back the drawn coordinates."""
    h = w = 64
    u = (torch.arange(w) + 0.5) / w
    v = (torch.arange(h) + 0.5) / h
    fmap = torch.stack([u[None, :].expand(h, w), v[:, None].expand(h, w)])[None]  # (1, 2, h, w)
    view_box = torch.tensor([[0.1, 0.2, 0.8, 0.9]])
    region = torch.tensor([[0.3, 0.25, 0.7, 0.6]])
    S = 4
    s = region_aligned_sample(fmap, view_box, torch.tensor([flip]), region, S)[0]
    for qi in range(S):
        for qj in range(S):
            cx = 0.3 + (qj + 0.5) / S * 0.4
            cy = 0.25 + (qi + 0.5) / S * 0.35
            x, y = _to_view([cx, cy], view_box[0].tolist(), flip)
            assert s[0, qi, qj].item() == pytest.approx(x, abs=1e-5)
            assert s[1, qi, qj].item() == pytest.approx(y, abs=1e-5)
    bx = _to_view(region[0].tolist(), view_box[0].tolist(), flip)
    assert bx[0] < bx[2] and bx[1] < bx[3]  # still (x1, y1, x2, y2)


class PixelBackbone(nn.Module):
    """A stand-in backbone whose features are a function of each patch's mean colour (so mirroring the image
    mirrors the feature map)."""

    num_heads = 2

    def __init__(self, patch=4, dim=8):
        super().__init__()
        torch.manual_seed(0)
        self.pool = nn.AvgPool2d(patch)
        self.proj = nn.Conv2d(3, dim, 1)

    def forward(self, x):
        f = torch.tanh(self.proj(self.pool(x)))  # (B, C, h, w)
        return {"pre": f.flatten(2).transpose(1, 2), "grid": tuple(f.shape[2:])}


def test_mirrored_view_registered_with_its_flip_has_identical_relations():
    bb = PixelBackbone()
    x = torch.randn(3, 3, 16, 16)
    boxes = torch.tensor([[0.1, 0.1, 0.9, 0.9], [0.1, 0.1, 0.9, 0.9]]).expand(3, 2, 4)
    mirrored = x.flip(-1)
    r = two_view_relations(bb, (x, mirrored), boxes, torch.tensor([[False, True]] * 3), 4, 2)
    assert row_tv(r["spatial"][0], r["spatial"][1]).max() < 1e-5
    assert row_tv(r["channel"][0], r["channel"][1]).max() < 1e-5  # channel relations ignore layout
    wrong = two_view_relations(bb, (x, mirrored), boxes, torch.tensor([[False, False]] * 3), 4, 2)
    assert row_tv(wrong["spatial"][0], wrong["spatial"][1]).mean() > 0.05
    same = two_view_relations(bb, (x, x), boxes, torch.tensor([[False, False]] * 3), 4, 2)
    assert torch.equal(same["spatial"][0], same["spatial"][1]) and torch.equal(same["channel"][0],
                                                                               same["channel"][1])


def test_standardisation_makes_relations_scale_free():
    bb = PixelBackbone()
    x = torch.randn(2, 3, 16, 16)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.25, 0.0, 1.0, 0.75]]).expand(2, 2, 4)
    flips = torch.zeros(2, 2, dtype=torch.bool)
    a = two_view_relations(bb, (x, x.roll(1, -1)), boxes, flips, 3, 2)

    class Scaled(nn.Module):
        num_heads = 2

        def forward(self, y):
            out = bb(y)
            return {"pre": 7.0 * out["pre"] + 3.0, "grid": out["grid"]}
    b = two_view_relations(Scaled(), (x, x.roll(1, -1)), boxes, flips, 3, 2)
    torch.testing.assert_close(a["spatial"], b["spatial"], rtol=0, atol=2e-3)  # up to the variance eps
    torch.testing.assert_close(a["channel"], b["channel"], rtol=0, atol=2e-3)
    raw = two_view_relations(Scaled(), (x, x.roll(1, -1)), boxes, flips, 3, 2, standardize=False)
    assert (raw["spatial"] - a["spatial"]).abs().max() > 0.1  # the check above can fail
