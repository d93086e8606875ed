"""Label propagation (eval/dense/propagation.py) and the DAVIS driver (eval/dense/vos.py): features built so the
right labels are known by hand, the window / top-k-tie / queue rules, and a float64 brute-force re-implementation of
DINO's label_propagation (full (hw)² window mask, no chunking) on random features."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from sere_scale.eval.dense.davis import evaluate_davis
from sere_scale.eval.dense.propagation import propagate_video
from sere_scale.eval.dense.vos import evaluate_sequences, norm_mask, resized_size, soft_to_labels

E = torch.eye(4, dtype=torch.float32)  # orthogonal unit features a, b, c, d = E[0..3]


def _feats(*rows):
    """(h, w, 4) features from rows of feature indices (index into E)."""
    return torch.stack([torch.stack([E[i] for i in r]) for r in rows])


def _onehot(labels, k):
    return torch.nn.functional.one_hot(torch.tensor(labels), k).permute(2, 0, 1).float()


def test_regions_with_their_own_features_propagate_exactly():
    # three regions (labels 0, 1, 2) whose patches carry the one-hot feature of their label; the layout moves from
    # frame to frame. A query's weight is e^10 with every context patch of its own label and e^0 = 1 with the others.
    # topk=1: the kept neighbours are exactly the ties at e^10, all of the query's label: the soft map is its one-hot
    # label. topk=5: a region with fewer than 5 patches in the context also keeps some weight-1 keys, a wrong-label
    # share below (context patches) / e^10 = 36 / 22026 < 2e-3; the argmax is still the layout.
    layouts = [[[0, 1, 1, 0], [0, 0, 2, 2], [0, 0, 0, 0]],
               [[0, 0, 1, 1], [2, 2, 0, 0], [0, 0, 0, 0]],
               [[0, 0, 0, 1], [0, 2, 2, 1], [0, 0, 0, 0]],
               [[2, 2, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]]]
    feats = [_feats(*lay) for lay in layouts]
    for nb, topk in ((0, 1), (12, 1), (0, 5), (12, 5)):
        out = propagate_video(feats, _onehot(layouts[0], 3), n_last_frames=2, topk=topk, neighborhood=nb)
        assert len(out) == 3
        for soft, lay in zip(out, layouts[1:]):
            assert soft.shape == (3, 3, 4) and soft.dtype == torch.float32
            torch.testing.assert_close(soft, _onehot(lay, 3), rtol=0, atol=1e-6 if topk == 1 else 2e-3)
            assert soft.argmax(0).tolist() == lay


def test_neighborhood_window_changes_the_answer():
    # 1 x 8 strip. Frame 0: patch 0 has feature a and label 1, patches 1..7 feature b and label 0.
    # Frame 1: patch 7 has feature a. topk=1.
    # No window: query 7's best key is frame 0's patch 0 (cos 1) -> label 1.
    # Window nb=2: only keys 5, 6, 7 (all b, cos 0, weight e^0 = 1, a 3-way tie, all kept) -> label 0.
    f0 = _feats([0, 1, 1, 1, 1, 1, 1, 1])
    f1 = _feats([1, 1, 1, 1, 1, 1, 1, 0])
    lab = _onehot([[1, 0, 0, 0, 0, 0, 0, 0]], 2)
    free = propagate_video([f0, f1], lab, topk=1, neighborhood=0)[0]
    near = propagate_video([f0, f1], lab, topk=1, neighborhood=2)[0]
    assert free[:, 0, 7].tolist() == [0.0, 1.0]
    assert near[:, 0, 7].tolist() == [1.0, 0.0]
    # the window is clipped at the border, not wrapped: query 0 (feature b) with nb=2 sees keys 0, 1, 2, of which
    # keys 1, 2 (b, weight e^10) win over key 0 (a, weight 1): label 0
    assert near[:, 0, 0].tolist() == [1.0, 0.0]


def test_topk_keeps_ties_at_the_threshold():
    # Frame 0 (1 x 4): features a, a, b, b with labels 1, 2, 0, 0 (K=3). Frame 1: every patch has feature a.
    f0, f1 = _feats([0, 0, 1, 1]), _feats([0, 0, 0, 0])
    lab = _onehot([[1, 2, 0, 0]], 3)
    # topk=1: weights e^10, e^10, 1, 1; the two at e^10 tie at the top-1 value and both stay: (0, 1/2, 1/2)
    soft = propagate_video([f0, f1], lab, topk=1, neighborhood=0)[0]
    torch.testing.assert_close(soft[:, 0, 0], torch.tensor([0.0, 0.5, 0.5]), rtol=0, atol=1e-7)
    # topk=3: the 3rd largest is 1, shared by keys 2 and 3: all four stay,
    # label 0 gets (1 + 1) / (2 e^10 + 2), labels 1 and 2 e^10 / (2 e^10 + 2) each
    soft = propagate_video([f0, f1], lab, topk=3, neighborhood=0)[0]
    z = 2 * math.exp(10) + 2
    torch.testing.assert_close(soft[:, 0, 2].double(), torch.tensor([2 / z, math.exp(10) / z, math.exp(10) / z],
                                                                    dtype=torch.float64), rtol=1e-6, atol=0)


def test_queue_length_decides_the_context():
    # 1 x 2 frames, K=2, features a, b, d = E[0], E[1], E[3]; topk=1, no window.
    # frame 0: features (a, b), labels (1, 0)
    # frame 1: (a, a): both match frame 0's patch 0 -> labels (1, 1)
    # frame 2: (b, b): both match frame 0's patch 1 only (frame 1 is all a) -> labels (0, 0)
    # frame 3: (d, d): cos 0 with everything, all context weights tie at 1 and stay -> the mean label of the context:
    #   n_last_frames=1: frames 0, 2 -> label-1 share (1+0+0+0)/4 = 1/4
    #   n_last_frames=2 (or 7): frames 0, 1, 2 -> (1+0+1+1+0+0)/6 = 1/2
    #   n_last_frames=0: frame 0 only -> 1/2 as well; frame 2 is then (0, 0) too
    feats = [_feats([0, 1]), _feats([0, 0]), _feats([1, 1]), _feats([3, 3])]
    lab = _onehot([[1, 0]], 2)
    expect = {0: 0.5, 1: 0.25, 2: 0.5, 7: 0.5}
    for n, share in expect.items():
        out = propagate_video(feats, lab, n_last_frames=n, topk=1, neighborhood=0)
        assert out[0][1].flatten().tolist() == [1.0, 1.0]
        assert out[1][1].flatten().tolist() == [0.0, 0.0]
        torch.testing.assert_close(out[2][1].flatten(), torch.tensor([share, share]), rtol=0, atol=1e-7)


def _dino_reference(feats, first_labels, n_last_frames, topk, temperature, nb):
    """float64 re-implementation of DINO's eval_video_tracking_davis / label_propagation loop, from its
    description: context = frame 0 (one-hot) + the last n_last_frames soft predictions; exp(cos/T) affinities over
    all context patches; (hw)² 0/1 window mask built patch by patch; keep the top-k (and ties) per query."""
    h, w, _ = feats[0].shape
    hw = h * w
    mask = torch.zeros(h, w, h, w, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            for p in range(h):
                for q in range(w):
                    if abs(p - i) <= nb and abs(q - j) <= nb:
                        mask[i, j, p, q] = 1
    mask = mask.reshape(hw, hw)

    def unit(f):  # (dim, hw)
        f = f.double().reshape(hw, -1)
        return (f / f.norm(dim=1, keepdim=True)).T

    first = first_labels.double()[None]
    queue, outs = [], []
    for t in range(1, len(feats)):
        src = torch.stack([unit(feats[0])] + [f for f, _ in queue])  # n x dim x hw
        segs = torch.cat([first] + [s for _, s in queue])  # n x K x h x w
        tar = unit(feats[t]).T  # hw x dim
        aff = torch.exp(torch.stack([tar @ s for s in src]) / temperature)  # n x hw(query) x hw(key)
        if nb > 0:
            aff = aff * mask[None]
        aff = aff.transpose(2, 1).reshape(-1, hw)  # n*hw (keys) x hw (queries)
        kmin = torch.topk(aff, k=topk, dim=0).values.min(dim=0).values
        aff[aff < kmin] = 0
        aff = aff / aff.sum(dim=0, keepdim=True)
        n, k = segs.shape[:2]
        seg = (segs.reshape(n, k, -1).transpose(2, 1).reshape(-1, k).T @ aff).reshape(1, k, h, w)
        if n_last_frames > 0 and len(queue) == n_last_frames:
            queue.pop(0)
        if n_last_frames > 0:
            queue.append((unit(feats[t]), seg))
        outs.append(seg[0])
    return outs


@pytest.mark.parametrize("nb,n_last,topk,chunk", [(0, 7, 5, None), (2, 3, 5, 7), (1, 1, 3, 5), (12, 2, 10, None),
                                                  (3, 0, 1, 4)])
def test_matches_a_float64_brute_force_of_dino(nb, n_last, topk, chunk):
    g = torch.Generator().manual_seed(100 + nb + 10 * n_last)
    h, w, c, k, n_frames = 5, 7, 16, 4, 7
    feats = [torch.randn(h, w, c, generator=g) * 3 + 0.5 for _ in range(n_frames)]
    first = _onehot(torch.randint(0, k, (h, w), generator=g).tolist(), k)
    got = propagate_video(feats, first, n_last_frames=n_last, topk=topk, temperature=0.1, neighborhood=nb,
                          query_chunk=chunk)
    ref = _dino_reference(feats, first, n_last, topk, 0.1, nb)
    assert len(got) == len(ref) == n_frames - 1
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=1e-5)


def test_bad_arguments_are_refused():
    f = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="first_labels"):
        propagate_video([f, f], torch.ones(2, 3, 3))
    with pytest.raises(ValueError, match="frame 1"):
        propagate_video([f, torch.randn(3, 3, 4)], torch.ones(2, 2, 3))
    with pytest.raises(ValueError, match="temperature"):
        propagate_video([f, f], torch.ones(2, 2, 3), temperature=0.01)  # exp(100) overflows float32
    with pytest.raises(ValueError, match="topk"):
        propagate_video([f, f], torch.ones(2, 2, 3), topk=7)  # only 6 context patches


# ---------------------------------------------------------------- driver (vos.py)

def test_resized_size_by_hand():
    assert resized_size(480, 854, 16) == (480, 848)  # 854 // 16 = 53 -> 848
    assert resized_size(480, 854, 14) == (476, 854)  # 480 // 14 = 34 -> 476; 854 = 61 * 14 stays
    assert resized_size(854, 480, 8) == (848, 480)  # portrait: 854 // 8 = 106 -> 848
    assert resized_size(40, 60, 8, short_side=32) == (32, 48)  # 60 * 32 / 40 = 48
    assert resized_size(50, 50, 8, short_side=36) == (32, 32)


def test_norm_mask_and_soft_to_labels():
    m = torch.tensor([[[0.2, 0.6], [1.0, 0.2]], [[0.0, 0.0], [0.0, 0.0]], [[-1.0, 0.0], [0.0, 0.0]]])
    out = norm_mask(m)
    # channel 0: (x - 0.2) / 0.8; channel 1 (max 0) and channel 2 (max 0) untouched
    torch.testing.assert_close(out[0], torch.tensor([[0.0, 0.5], [1.0, 0.0]]))
    assert torch.equal(out[1:], m[1:])
    # one-hot 2 x 3 patch map, patch 2: bilinear x2 then argmax keeps the patch blocks (no half-way ties when the
    # scale is even), then NEAREST x1.5 to 6 x 9
    lab = torch.tensor([[0, 1, 1], [2, 2, 0]])
    soft = torch.nn.functional.one_hot(lab, 3).permute(2, 0, 1).float()
    got = soft_to_labels(soft, 2, (6, 9))
    expect = np.repeat(np.repeat(lab.numpy(), 3, axis=0), 3, axis=1)
    assert got.dtype == np.uint8 and np.array_equal(got, expect)


def _tiny_davis(root, frames=4):
    """One 40 x 60 sequence 'box': a red full-height stripe 20 px wide (label 1) on black moving right 10 px a frame,
    and a green full-height stripe (label 2) fixed over the last 10 columns. (Stripes: bilinear upsampling then argmax
    rounds the corners of a block, DINO's output does too, but keeps straight patch edges in place.)"""
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("box\n")
    for t in range(frames):
        img = np.zeros((40, 60, 3), np.uint8)
        lab = np.zeros((40, 60), np.uint8)
        img[:, 10 * t:10 * t + 20] = (255, 0, 0)
        lab[:, 10 * t:10 * t + 20] = 1
        img[:, 50:60] = (0, 255, 0)
        lab[:, 50:60] = 2
        for kind in ("JPEGImages", "Annotations"):
            (root / kind / "480p" / "box").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "JPEGImages" / "480p" / "box" / f"{t:05d}.jpg", quality=100, subsampling=0)
        im = Image.fromarray(lab)
        im.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (253 * 3))
        im.save(root / "Annotations" / "480p" / "box" / f"{t:05d}.png")


def _colour_features(x):
    """Patch-mean colour (8 x 8 patches) of a normalised frame, as (h, w, 3)."""
    return torch.nn.functional.avg_pool2d(x[None], 8)[0].permute(1, 2, 0)


def test_driver_end_to_end_on_a_tiny_davis(tmp_path):
    # frames 40 x 60 -> short side 32: 32 x 48, patch 8 -> 4 x 6 grid; stripe edges fall on patch edges (every 8 px
    # after the x0.8 resize), the colour features find each stripe, and after bilinear x8 (own patch weight > 1/2
    # on each side of an edge), argmax and NEAREST x1.25 back (source column floor((X + 0.5) * 0.8) crosses 8k
    # exactly at X = 10k) the written PNGs equal the annotations
    _tiny_davis(tmp_path / "davis")
    out = tmp_path / "out"
    names = evaluate_sequences(tmp_path / "davis", "val", _colour_features, out, 8, short_side=32, topk=3,
                               neighborhood=2)
    assert names == ["box"]
    for t in range(4):
        got = Image.open(out / "box" / f"{t:05d}.png")
        assert got.mode == "P" and got.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]
        ann = np.array(Image.open(tmp_path / "davis" / "Annotations" / "480p" / "box" / f"{t:05d}.png"))
        assert np.array_equal(np.array(got), ann), t
    scores = evaluate_davis(tmp_path / "davis", out, "val")
    assert scores["J-Mean"] == 1.0 and scores["F-Mean"] == 1.0


def test_driver_names_the_missing_first_annotation_and_size_mismatch(tmp_path):
    _tiny_davis(tmp_path / "davis")
    ann = tmp_path / "davis" / "Annotations" / "480p" / "box" / "00000.png"
    ann.unlink()
    with pytest.raises(FileNotFoundError, match="00000.png"):
        evaluate_sequences(tmp_path / "davis", "val", _colour_features, tmp_path / "out", 8, short_side=32)
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(ann)
    with pytest.raises(ValueError, match="00000.png"):
        evaluate_sequences(tmp_path / "davis", "val", _colour_features, tmp_path / "out", 8, short_side=32)
    with pytest.raises(FileNotFoundError, match="ImageSets"):
        evaluate_sequences(tmp_path / "davis", "train", _colour_features, tmp_path / "out", 8)
