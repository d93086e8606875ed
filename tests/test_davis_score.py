"""DAVIS-2017 semi-supervised scoring (eval/dense/davis.py) against values worked out by hand from the toolkit's
definitions: J, seg2bmap boundaries, the boundary F with its disk tolerance, the per-object statistics, a tiny DAVIS
folder scored end to end (void pixels, a result with fewer objects, first/last frames unscored) and its CSVs."""
import numpy as np
import pytest
from PIL import Image

from sere_scale.eval.dense.davis import (boundary_f, boundary_radius, db_statistics, dilate_disk, evaluate_davis,
                                         jaccard, seg2bmap)


def _block(shape, rows, cols):
    m = np.zeros(shape, bool)
    m[rows[0]:rows[1] + 1, cols[0]:cols[1] + 1] = True
    return m


def test_seg2bmap_by_hand():
    # a block not touching the border: its boundary is the ring of [r0-1 .. r1] x [c0-1 .. c1] (a pixel differs from
    # its east, south or south-east neighbour): block rows/cols 2..5 in 8 x 8 -> ring rows/cols 1..5, 16 pixels
    b = seg2bmap(_block((8, 8), (2, 5), (2, 5)))
    ring = _block((8, 8), (1, 5), (1, 5)) & ~_block((8, 8), (2, 4), (2, 4))
    assert np.array_equal(b, ring) and b.sum() == 16
    # bottom-right 2 x 2 block of a 4 x 4: last row = seg ^ east, last column = seg ^ south, corner 0
    assert seg2bmap(_block((4, 4), (2, 3), (2, 3))).astype(int).tolist() == [[0, 0, 0, 0],
                                                                              [0, 1, 1, 1],
                                                                              [0, 1, 0, 0],
                                                                              [0, 1, 0, 0]]
    # top-left 2 x 2 block: (0, 0) equals its east, south and south-east neighbours -> not boundary
    assert seg2bmap(_block((4, 4), (0, 1), (0, 1))).astype(int).tolist() == [[0, 1, 0, 0],
                                                                              [1, 1, 0, 0],
                                                                              [0, 0, 0, 0],
                                                                              [0, 0, 0, 0]]
    # a full mask has no boundary at all (the image border is not one)
    assert not seg2bmap(np.ones((4, 5), bool)).any()


def test_boundary_radius_by_hand():
    assert boundary_radius(480, 854) == 8  # 0.008 * sqrt(480² + 854²) = 0.008 * 979.65 = 7.84 -> 8
    assert boundary_radius(10, 10) == 1  # 0.008 * 14.14 = 0.11 -> 1
    assert boundary_radius(150, 150) == 2  # 0.008 * 212.1 = 1.70 -> 2
    assert boundary_radius(10, 10, bound_th=3) == 3


def test_dilate_disk_against_the_definition():
    rng = np.random.default_rng(0)
    maps = rng.random((3, 23, 31)) < 0.02
    for radius in (1, 2, 3, 5):
        ref = np.zeros_like(maps)
        for n, y, x in zip(*np.nonzero(maps)):
            for i in range(-radius, radius + 1):
                for j in range(-radius, radius + 1):
                    if i * i + j * j <= radius * radius and 0 <= y + i < 23 and 0 <= x + j < 31:
                        ref[n, y + i, x + j] = True
        assert np.array_equal(dilate_disk(maps, radius), ref), radius


SQ = ((2, 5), (2, 5))  # a 4 x 4 square


def test_j_and_f_by_hand():
    shape = (10, 10)  # tolerance 1 pixel: the disk is the centre and its 4 neighbours
    sq = _block(shape, *SQ)
    empty = np.zeros(shape, bool)
    # both empty: J = 1 (empty union); no boundary on either side: P = R = 1, F = 1
    assert jaccard(empty, empty) == 1.0 and boundary_f(empty, empty) == 1.0
    # result empty: J = 0; n_fg = 0 < n_gt: P = 1, R = 0 -> F = 0. gt empty, result not: P = 0, R = 1 -> F = 0
    assert jaccard(sq, empty) == 0.0 and boundary_f(empty, sq) == 0.0
    assert jaccard(empty, sq) == 0.0 and boundary_f(sq, empty) == 0.0
    # a full result on an empty ground truth: J = 0 but neither has a boundary pixel: F = 1
    assert jaccard(empty, np.ones(shape, bool)) == 0.0 and boundary_f(np.ones(shape, bool), empty) == 1.0
    # shifted one column (cols 3..6): intersection 4 x 3 = 12, union 20 -> J = 0.6; rings cols 1..5 and 2..6: every
    # ring pixel of one is on, or a 4-neighbour of, the other ring -> P = R = 1, F = 1
    sh1 = _block(shape, SQ[0], (3, 6))
    assert jaccard(sq, sh1) == pytest.approx(0.6, abs=1e-12) and boundary_f(sh1, sq) == 1.0
    # shifted two columns (cols 4..7): J = 8 / 24 = 1/3. Result ring rows 1..5 x cols 3..7 (16 px) against gt ring
    # rows 1..5 x cols 1..5: matched are (1, 3..6), (5, 3..6) [on the gt ring or next to (1|5, 5)] and (2, 3), (4, 3)
    # [next to (1, 3), (5, 3)]; unmatched (1, 7), (5, 7), (3, 3), (2..4, 7) -> P = 10/16; mirror image: R = 10/16;
    # F = 10/16 = 0.625
    sh2 = _block(shape, SQ[0], (4, 7))
    assert jaccard(sq, sh2) == pytest.approx(1 / 3, abs=1e-12)
    assert boundary_f(sh2, sq) == pytest.approx(0.625, abs=1e-12)
    # the same shift in a 150 x 150 image: tolerance 2 pixels, every unmatched pixel above is 2 away from the other
    # ring ((1, 7)-(1, 5), (3, 3)-(3, 1), (3, 7)-(3, 5) ...): F = 1
    big = (150, 150)
    assert boundary_f(_block(big, SQ[0], (4, 7)), _block(big, *SQ)) == 1.0
    # the square against the square less its corner (5, 5) (as when that pixel is void: void counts as background):
    # J = 15/16; the gt ring swaps (5, 5) for (4, 4), each a 4-neighbour of (4, 5) on both rings: F = 1
    notch = sq.copy()
    notch[5, 5] = False
    assert jaccard(notch, sq) == 15 / 16 and boundary_f(sq, notch) == 1.0


def test_db_statistics_by_hand():
    # n = 10: ids = round(linspace(1, 10, 5) + 1e-10) - 1 = round([1, 3.25, 5.5, 7.75, 10]) - 1 = [0, 2, 5, 7, 9];
    # bin 0 = v[0:3], bin 3 = v[7:10]
    v = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]
    m, o, d = db_statistics(v)
    assert m == pytest.approx(0.45) and o == 0.4  # 0.9, 0.8, 0.7, 0.6 exceed 0.5 (0.5 does not)
    assert d == pytest.approx((0.9 + 0.8 + 0.7) / 3 - (0.2 + 0.1 + 0.0) / 3)
    # n = 3: linspace(1, 3, 5) = [1, 1.5, 2, 2.5, 3] -> [0, 1, 1, 2, 2] (1.5 and 2.5 round up through the 1e-10):
    # bin 0 = v[0:2], bin 3 = v[2:3]
    assert db_statistics([1.0, 0.6, 0.0])[2] == pytest.approx(0.8)
    # n = 2: [0, 0, 1, 1, 1]: bin 0 = [v0], bin 3 = [v1]; n = 1: both bins [v0], decay 0
    assert db_statistics([0.75, 0.25]) == (0.5, 0.5, 0.5)
    assert db_statistics([0.3]) == (0.3, 0.0, 0.0)
    # NaNs are skipped by the means
    assert db_statistics([1.0, np.nan, 0.0])[0] == 0.5


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.asarray(arr, np.uint8))
    im.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (253 * 3))
    im.save(path)


A1 = ((2, 5), (2, 5))  # object 1's square; object 2's is ten columns to the right
A2 = ((2, 5), (12, 15))


def _labels(*objs):
    """(10, 20) labels: objs[k-1] = ((rows), (cols)) of object k, None for absent."""
    lab = np.zeros((10, 20), np.uint8)
    for k, o in enumerate(objs, start=1):
        if o is not None:
            lab[o[0][0]:o[0][1] + 1, o[1][0]:o[1][1] + 1] = k
    return lab


def _shift(o, dc):
    return (o[0], (o[1][0] + dc, o[1][1] + dc))


def _tiny_davis(root):
    """Two 10 x 20 sequences (tolerance 1 px), val.txt lists beta before alpha.
    alpha (4 frames): gt = squares A1, A2. frame 1: gt pixel (5, 5) void; result A1 whole, A2 shifted 1 column.
    frame 2: gt has a label-3 pixel (not an object: objects come from frame 0); result A1 shifted 2 columns, no A2.
    beta (5 frames): gt = A1, A2 in every frame, frame 0 with a void row; result label 1 only: A1, A1 shifted 1,
    A1 shifted 2 on frames 1..3; no result PNG for frames 0 and 4 (never read)."""
    ann, res = root / "davis" / "Annotations" / "480p", root / "res"
    (root / "davis" / "ImageSets" / "2017").mkdir(parents=True)
    (root / "davis" / "ImageSets" / "2017" / "val.txt").write_text("beta\nalpha\n")
    gt = [_labels(A1, A2) for _ in range(4)]
    gt[1][5, 5] = 255
    gt[2][8, 0] = 3
    out = [_labels(A1, A2), _labels(A1, _shift(A2, 1)), _labels(_shift(A1, 2), None), _labels(A1, A2)]
    for t in range(4):
        _png(ann / "alpha" / f"{t:05d}.png", gt[t])
        _png(res / "alpha" / f"{t:05d}.png", out[t])
    for t in range(5):
        g = _labels(A1, A2)
        if t == 0:
            g[0, :] = 255
        _png(ann / "beta" / f"{t:05d}.png", g)
    for t in (1, 2, 3):
        _png(res / "beta" / f"{t:05d}.png", _labels(_shift(A1, t - 1)))
    return root / "davis", res


def test_tiny_davis_end_to_end(tmp_path):
    davis, res = _tiny_davis(tmp_path)
    got = evaluate_davis(davis, res, "val")
    # per object (J frames; F frames), from the hand cases of test_j_and_f_by_hand:
    # alpha_1: J (15/16, 1/3), F (1, 5/8)     -> J M 61/96, R 1/2, D 29/48;  F M 13/16, R 1, D 3/8
    # alpha_2: J (3/5, 0), F (1, 0)           -> J M 3/10, R 1/2, D 3/5;     F M 1/2, R 1/2, D 1
    # beta_1: J (1, 3/5, 1/3), F (1, 1, 5/8)  -> J M 29/45, R 2/3, D 4/5 - 1/3 = 7/15;  F M 7/8, R 1, D 3/8
    # beta_2: never in the results: J and F 0 on every frame -> all 0
    per = {"beta_1": (29 / 45, 7 / 8), "beta_2": (0.0, 0.0), "alpha_1": (61 / 96, 13 / 16), "alpha_2": (0.3, 0.5)}
    assert list(got["per_object"]) == list(per)  # the order of val.txt, objects 1..N
    for k, (j, f) in per.items():
        assert got["per_object"][k]["J-Mean"] == pytest.approx(j, abs=1e-12)
        assert got["per_object"][k]["F-Mean"] == pytest.approx(f, abs=1e-12)
    expect = {"J-Mean": (61 / 96 + 3 / 10 + 29 / 45) / 4, "J-Recall": (1 / 2 + 1 / 2 + 2 / 3) / 4,
              "J-Decay": (29 / 48 + 3 / 5 + 7 / 15) / 4, "F-Mean": (13 / 16 + 1 / 2 + 7 / 8) / 4,
              "F-Recall": (1 + 1 / 2 + 1) / 4, "F-Decay": (3 / 8 + 1 + 3 / 8) / 4}
    expect["J&F-Mean"] = (expect["J-Mean"] + expect["F-Mean"]) / 2
    for k, v in expect.items():
        assert got[k] == pytest.approx(v, abs=1e-12), k
    # the CSVs of the toolkit's evaluation_method.py (pandas to_csv, index=False, "%.3f"):
    # J&F 0.47092, J 0.39497, JR 0.41667, JD 0.41771, F 0.546875, FR 0.625, FD 0.4375 (half-even: 0.438)
    assert (res / "global_results-val.csv").read_text() == (
        "J&F-Mean,J-Mean,J-Recall,J-Decay,F-Mean,F-Recall,F-Decay\n0.471,0.395,0.417,0.418,0.547,0.625,0.438\n")
    assert (res / "per-sequence_results-val.csv").read_text() == (
        "Sequence,J-Mean,F-Mean\nbeta_1,0.644,0.875\nbeta_2,0.000,0.000\nalpha_1,0.635,0.812\n"
        "alpha_2,0.300,0.500\n")


def test_scoring_errors_name_the_file(tmp_path):
    davis, res = _tiny_davis(tmp_path)
    (res / "alpha" / "00002.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"alpha/00002\.png"):
        evaluate_davis(davis, res, "val")
    _png(res / "alpha" / "00002.png", np.zeros((10, 21)))
    with pytest.raises(ValueError, match=r"alpha/00002\.png.*size"):
        evaluate_davis(davis, res, "val")
    _png(res / "alpha" / "00002.png", _labels(A1, A2, ((8, 8), (0, 0))))  # a third object: the gt has two
    with pytest.raises(ValueError, match="label 3.*2 object"):
        evaluate_davis(davis, res, "val")
    with pytest.raises(FileNotFoundError, match=r"ImageSets/2017/test\.txt"):
        evaluate_davis(davis, res, "test")
    with pytest.raises(FileNotFoundError, match=r"Annotations/480p.*looked for"):
        evaluate_davis(tmp_path / "nowhere", res, "val")
