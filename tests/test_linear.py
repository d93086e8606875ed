"""Linear probe: the probe itself on features with a known answer, the on-disk feature cache, the command, and
a trained backbone against the same backbone at random init on the embedded digits."""
import json

import pytest
import torch
import torch.nn as nn

from sere_scale.eval.linear import cached_features, linear_probe, topk_accuracy, train_linear


def _clusters(n, num_classes, dim, noise, seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=g)
    y = torch.arange(n) % num_classes
    return centers[y] + noise * torch.randn(n, dim, generator=g), y


def test_probe_reads_the_label_when_features_carry_it_and_not_otherwise():
    f, y = _clusters(600, 5, 16, noise=0.8, seed=0)
    res = linear_probe(f[:500], y[:500], f[500:], y[500:], 5, lrs=(0.1, 1.0), epochs=20)
    assert res["top1"] > 95 and res["top5"] == 100
    g = torch.Generator().manual_seed(1)
    rand = torch.randn(600, 16, generator=g)  # independent of the label
    res = linear_probe(rand[:500], y[:500], rand[500:], y[500:], 5, lrs=(0.1, 1.0), epochs=20)
    assert res["top1"] < 40  # chance is 20%


def test_probe_is_a_single_linear_layer_on_standardised_features():
    f, y = _clusters(200, 3, 8, noise=1.0, seed=2)
    f = f * 50 + 7  # scale and offset are removed by the standardisation
    probe = train_linear(f, y, 3, lr=0.3, epochs=10)
    assert [type(m) for m in probe.modules() if type(m) is not type(probe)] == [nn.Linear]
    torch.testing.assert_close(probe.mean, f.mean(0))
    torch.testing.assert_close(probe.std, f.std(0))
    x = f[:5]
    torch.testing.assert_close(probe(x), probe.fc((x - f.mean(0)) / f.std(0)))
    top1, top5 = topk_accuracy(probe, f, y)
    assert top1 > 80 and top5 == 100


def test_learning_rate_is_chosen_on_held_out_training_features():
    f, y = _clusters(300, 4, 8, noise=1.5, seed=3)
    lrs = (1e-4, 0.3)
    a = linear_probe(f[:200], y[:200], f[200:], y[200:], 4, lrs=lrs, epochs=5)
    shuffled = y[200:][torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    b = linear_probe(f[:200], y[:200], f[200:], shuffled, 4, lrs=lrs, epochs=5)  # other val labels
    assert set(a["holdout_top1"]) == {"0.0001", "0.3"}
    assert a["lr"] == b["lr"] == max(lrs, key=lambda lr: a["holdout_top1"][str(lr)])
    assert a["holdout_top1"] == b["holdout_top1"] and a["top1"] != b["top1"]


class CountingBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return {"cls": x.mean((2, 3))}


def test_features_are_computed_once_and_cached_per_key(tmp_path, digits_root):
    bb = CountingBackbone()
    val = digits_root / "val"
    f1, y1, c1 = cached_features(bb, val, 32, tmp_path, {"checkpoint": "a"}, batch_size=512)
    n = bb.calls
    assert n > 0 and f1.shape == (359, 3) and len(c1) == 10
    f2, y2, _ = cached_features(bb, val, 32, tmp_path, {"checkpoint": "a"}, batch_size=512)
    assert bb.calls == n and torch.equal(f1, f2) and torch.equal(y1, y2)
    cached_features(bb, val, 32, tmp_path, {"checkpoint": "b"}, batch_size=512)  # another key: recomputed
    assert bb.calls == 2 * n and len(list(tmp_path.glob("features_*.pt"))) == 2


class ScaledBackbone(CountingBackbone):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        self.calls += 1
        return {"cls": x.mean((2, 3)) * self.scale}


def test_cache_tells_apart_other_weights_under_the_same_key(tmp_path, digits_root):
    """A run retrained into the same folder has the same checkpoint path: its new weights must not be served
    the old features."""
    bb, val = ScaledBackbone(), digits_root / "val"
    f1, _, _ = cached_features(bb, val, 32, tmp_path, {"checkpoint": "a"}, batch_size=512)
    n = bb.calls
    cached_features(bb, val, 32, tmp_path, {"checkpoint": "a"}, batch_size=512)
    assert bb.calls == n  # same weights: cached
    with torch.no_grad():
        bb.scale[1] = -2.0
    f2, _, _ = cached_features(bb, val, 32, tmp_path, {"checkpoint": "a"}, batch_size=512)
    assert bb.calls == 2 * n and not torch.allclose(f2, f1)  # recomputed with the new weights


class PixelBackbone(nn.Module):
    """'Features' that carry the digit: the image average-pooled to 8×8 (the digits' native resolution)."""

    def forward(self, x):
        return {"cls": torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)}


class NoiseBackbone(nn.Module):
    """Features independent of the image."""

    def __init__(self):
        super().__init__()
        self.g = torch.Generator().manual_seed(0)

    def forward(self, x):
        return {"cls": torch.randn(x.shape[0], 32, generator=self.g)}


def test_on_the_digits_label_carrying_features_beat_uninformative_ones(tmp_path, digits_root):
    """End to end on the embedded data (folders → cached features → probe → val accuracy): train and val
    labels line up, so pixel features score far above chance and image-independent features do not."""
    from sere_scale.eval.linear import linear_accuracy
    tr, va = str(digits_root / "train"), str(digits_root / "val")
    pix = linear_accuracy(PixelBackbone(), tr, va, 32, tmp_path, {"b": "pixels"}, lrs=(0.1, 1.0), epochs=20)
    noise = linear_accuracy(NoiseBackbone(), tr, va, 32, tmp_path, {"b": "noise"}, lrs=(0.1, 1.0), epochs=20)
    assert pix["n_train"] == 1438 and pix["n_val"] == 359
    assert pix["top1"] > 85 and noise["top1"] < 25, (pix["top1"], noise["top1"])


# DINO+SERE (default SERE weights), 100 steps of 32 images, no warm-up. Measured gains of the trained teacher over
# its random init (linear top-1, digits val) with train.seed 0 / 1 / 2: +2.8 / +10.6 / +11.1 points. MoCo v3+SERE
# needs far more steps on this data to pass its random init (docs/EVAL.md), so the brief run is DINO+SERE.
BRIEF_TRAINING = ["image_loss.kind=dino", "train.seed=1", "train.max_steps=100", "train.epochs=10",
                  "data.batch_size=32", "optim.warmup_epochs=0", "optim.base_lr=0.002", "optim.momentum_teacher=0.99",
                  "checkpoint.every_steps=100", "train.log_every=50"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digits_root):
    from sere_scale.run.train import train
    from tests.tiny import tiny_config
    run = tmp_path_factory.mktemp("linear") / "run"
    train(tiny_config(run, digits_root / "train", *BRIEF_TRAINING))
    return run


def test_trained_teacher_beats_its_random_init_on_the_digits(run_dir, digits_root, tmp_path):
    from sere_scale.eval.linear import linear_accuracy
    from sere_scale.models.load import load_teacher
    top1 = {}
    for rand in (True, False):
        _, net = load_teacher(run_dir, random_init=rand)
        top1[rand] = linear_accuracy(net.backbone, str(digits_root / "train"), str(digits_root / "val"), 32,
                                     tmp_path, {"random_init": rand}, epochs=30)["top1"]
    assert top1[False] > top1[True] + 4, top1


def test_linear_command_writes_results_and_reuses_its_cache(run_dir, digits_root, capsys, monkeypatch):
    from sere_scale.cli import main
    argv = ["linear", "--checkpoint", str(run_dir), "--train-data", str(digits_root / "train"),
            "--val-data", str(digits_root / "val"), "--epochs", "5", "--lrs", "0.3,1", "--batch-size", "256"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n_val"] == 359 and 25 < res["top1"] <= res["top5"] <= 100 and res["lr"] in (0.3, 1.0)
    assert json.loads((run_dir / "linear" / "linear.json").read_text())["top1"] == res["top1"]
    assert len(list((run_dir / "linear").glob("features_*.pt"))) == 2  # train and val
    import sere_scale.eval.linear as lin

    def no_extraction(*a, **k):
        raise AssertionError("features should come from the cache")
    monkeypatch.setattr(lin, "extract_features", no_extraction)
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["top1"] == res["top1"]
    with pytest.raises(AssertionError, match="cache"):  # random init: another cache key
        main([*argv, "--random-init"])
