"""Segmentation probes (eval/dense/nn_probe.py, linear_probe.py, segprobe.py): exact retrieval against a float64
brute force, hand-worked histograms / windows / schedule, and toy data sets whose answer is known."""
import json
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from sere_scale.eval.dense.layouts import find_dataset
from sere_scale.eval.dense.linear_probe import (cache_features, linear_evaluate, lr_at, slide_scores,
                                                train_linear, train_linear_cached, window_starts)
from sere_scale.eval.dense.metrics import SegmentationMeter
from sere_scale.eval.dense.nn_probe import (PatchBank, build_bank, chunked_topk, nn_evaluate, patch_histograms,
                                            sample_patches)
from sere_scale.eval.dense.segprobe import run_segprobe

COLOURS = {0: (255, 0, 0), 1: (0, 255, 0), 2: (0, 0, 255), 255: (128, 128, 128)}


def toy_folder(root, n_train=6, n_val=3, seed=0):
    """Generic layout: images of 8-px stripes (vertical or horizontal), each one class (or ignored) painted in that
    class's colour. (Stripes, not a checkerboard: where 2-D blocks meet at a corner, bilinear upsampling of exact
    patch scores can give a corner pixel to its neighbours' class.)"""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            hb, wb = (4, 5) if i % 2 else (5, 4)
            stripes = rng.choice([0, 1, 2, 255], size=wb if i % 2 else hb, p=[0.3, 0.3, 0.3, 0.1])
            blocks = np.tile(stripes, (hb, 1)) if i % 2 else np.tile(stripes[:, None], (1, wb))
            lab = np.kron(blocks, np.ones((8, 8), np.int64)).astype(np.uint8)
            img = np.array([COLOURS[int(v)] for v in lab.reshape(-1)], np.uint8).reshape(*lab.shape, 3)
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "masks" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / "images" / split / f"{i}.png")
            Image.fromarray(lab).save(root / "masks" / split / f"{i}.png")
    assert lab.shape == (8 * hb, 8 * wb)
    return root


def colour_features(x):
    """4-px patch features that encode the colour, hence the class."""
    return F.avg_pool2d(x, 4)


def test_chunked_topk_matches_float64_brute_force():
    g = torch.Generator().manual_seed(0)
    q, bank = torch.randn(50, 16, generator=g), torch.randn(1000, 16, generator=g)
    sim = q.double() @ bank.double().T
    want_v, want_i = sim.topk(7, dim=1)
    for qc, bc in ((13, 97), (64, 1000), (1, 5)):
        v, i = chunked_topk(q, bank, 7, query_chunk=qc, bank_chunk=bc)
        torch.testing.assert_close(v.double(), want_v, rtol=0, atol=1e-5)
        assert torch.equal(i, want_i)
    v, i = chunked_topk(q[:2], bank[:3], 30)  # k larger than the bank: all of it
    assert v.shape == (2, 3) and torch.equal(i, sim[:2, :3].topk(3, dim=1).indices)


def test_patch_histograms_hand_worked():
    lab = torch.tensor([[0, 0, 1, 255], [0, 1, 255, 255], [2, 2, 255, 255], [2, 2, 255, 255]])
    hist, valid = patch_histograms(lab, 2, 3, 255)
    want = torch.tensor([[0.75, 0.25, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]])
    torch.testing.assert_close(hist, want)
    assert valid.tolist() == [True, True, True, False]
    hist, valid = patch_histograms(torch.tensor([[1, 0, 2], [1, 1, 2], [0, 255, 2]]), 2, 3, 255)  # padded to 4x4
    torch.testing.assert_close(hist, torch.tensor([[0.25, 0.75, 0], [0, 0, 1], [1, 0, 0], [0, 0, 1]]))
    assert valid.all()


def test_sampling_prefers_rare_classes_and_is_seeded():
    hist = torch.zeros(101, 2)
    hist[:100, 0] = 1
    hist[100, 1] = 1  # one patch of a rare class
    for seed in range(20):  # uniform sampling would keep it with probability 10/101
        idx = sample_patches(hist, 10, torch.Generator().manual_seed(seed))
        assert 100 in idx.tolist() and len(set(idx.tolist())) == 10
    a = sample_patches(hist, 10, torch.Generator().manual_seed(3))
    assert torch.equal(a, sample_patches(hist, 10, torch.Generator().manual_seed(3)))
    assert sample_patches(hist[:5], 10, torch.Generator()).tolist() == [0, 1, 2, 3, 4]


def test_soft_labels_hand_computed():
    feats = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]]), dim=1)
    hists = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [1.0, 0.0]])
    q = F.normalize(torch.tensor([[0.6, 0.8]]), dim=1)
    # cosines: 0.6, 0.96, 0.8, -0.6 -> the k=2 nearest are rows 1 (0.96) and 2 (0.8)
    w1 = 1 / (1 + math.exp((0.8 - 0.96) / 0.05))
    want = torch.tensor([[w1 * 0.5, w1 * 0.5 + (1 - w1) * 1.0]], dtype=torch.float64)
    got = PatchBank(feats, hists).soft_labels(q, k=2, temperature=0.05, bank_chunk=3)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)


def test_nn_probe_recovers_toy_labels(tmp_path):
    root = toy_folder(tmp_path)
    tr, va = find_dataset(root, "train", 3, 255), find_dataset(root, "val", 3, 255)
    bank = build_bank(colour_features, 4, tr, size=32, memory_size=60, seed=0)
    assert len(bank) == 60  # 10 of each image's 80 patches (every patch has a labelled pixel or is skipped)
    torch.testing.assert_close(bank.features.norm(dim=1), torch.ones(60))
    meter = SegmentationMeter(3, 255)
    nn_evaluate(colour_features, 4, bank, va, 32, meter, k=5)
    r = meter.compute()
    assert r["mIoU"] == 1.0 and r["aAcc"] == 1.0


def test_linear_probes_learn_toy_labels(tmp_path):
    root = toy_folder(tmp_path)
    tr, va = find_dataset(root, "train", 3, 255), find_dataset(root, "val", 3, 255)
    head = train_linear(colour_features, 4, 3, tr, size=32, crop=16, iters=80, batch_size=4, lr=0.05, warmup=5)
    m = SegmentationMeter(3, 255)
    linear_evaluate(colour_features, head, 4, va, 32, m)
    assert m.compute()["mIoU"] == 1.0
    maps, labels = cache_features(colour_features, tr, 32)
    assert maps[0].dtype == torch.float16 and labels[0].dtype == torch.uint8
    head = train_linear_cached(maps, labels, 4, 3, 255, iters=80, batch_size=3, lr=0.05, warmup=5)
    m = SegmentationMeter(3, 255)
    linear_evaluate(colour_features, head, 4, va, 32, m, mode="slide", crop=16, stride=12)
    assert m.compute()["mIoU"] == 1.0


def test_sliding_window_average_hand_worked():
    assert window_starts(10, 4, 3) == [(0, 4), (3, 7), (6, 10)]
    assert window_starts(11, 4, 3) == [(0, 4), (3, 7), (6, 10), (7, 11)]  # the last window moved back
    assert window_starts(3, 4, 3) == [(0, 3)]

    def top_left(xw):  # every window scores its own top-left pixel value everywhere
        return xw[:, :1, :1, :1].expand(1, 1, *xw.shape[-2:])
    x = torch.arange(11.0).expand(1, 3, 4, 11)
    got = slide_scores(x, top_left, crop=4, stride=3)[0, 0]
    want = torch.tensor([0, 0, 0, 1.5, 3, 3, 4.5, 6.5, 6.5, 6.5, 7]).expand(4, 11)
    torch.testing.assert_close(got, want)


def test_lr_schedule():
    assert lr_at(0, 100, 1.0, 10, "poly") == pytest.approx(1e-6)
    assert lr_at(5, 100, 1.0, 10, "poly") == pytest.approx(1e-6 + (1 - 1e-6) * 0.5)
    assert lr_at(10, 100, 1.0, 10, "poly") == 1.0
    assert lr_at(55, 100, 1.0, 10, "poly") == pytest.approx(0.5)
    assert lr_at(55, 100, 1.0, 10, "cosine") == pytest.approx(0.5)
    assert lr_at(32.5, 100, 1.0, 10, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_run_segprobe_driver(tmp_path):
    from safetensors.torch import save_file
    root = toy_folder(tmp_path / "data", n_train=2, n_val=2)
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64,
                            depth=2, num_heads=4, num_classes=0).eval()
    res = run_segprobe(vit, root, method="nn", size=32, memory_size=40, num_classes=3, ignore_index=255,
                       out=tmp_path / "out")
    assert json.loads((tmp_path / "out" / "segprobe.json").read_text()) == res
    assert res["protocol"]["name"] == "hummingbird-nn" and res["protocol"]["k"] == 30
    assert len(res["IoU"]) == 3 and 0 <= res["aAcc"] <= 1 and res["data"]["layout"] == "generic"
    save_file(vit.state_dict(), str(tmp_path / "vit.safetensors"))
    again = run_segprobe(tmp_path / "vit.safetensors", root, method="nn", size=32, memory_size=40, num_classes=3,
                         ignore_index=255, arch="vit_tiny_cpu")
    assert again["IoU"] == res["IoU"] and again["aAcc"] == res["aAcc"]
    lin = run_segprobe(vit, root, method="linear", size=32, crop=16, iters=2, batch_size=2, num_classes=3,
                       ignore_index=255, inference="slide", layers=2)
    assert lin["protocol"]["name"] == "linear" and lin["protocol"]["stride"] == 10
    assert lin["protocol"]["layers"] == 2 and len(lin["IoU"]) == 3
    with pytest.raises(ValueError, match="method"):
        run_segprobe(vit, root, method="knn", num_classes=3, ignore_index=255)
