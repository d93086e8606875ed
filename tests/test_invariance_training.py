"""SERE training makes self-relations more invariant: after a short CPU run (60 steps of a tiny ViT on the
digits) the teacher's spatial and channel relations change less between two views than at random init, and
its channel relations less than after the same run without the SERE losses (alpha = beta = 0): the channel
gain is SERE's. (At 60 steps the spatial gain is the same with and without SERE; in the 220-step demo SERE
adds to it — docs/VISUALIZE.md.)
The measure is the correlation distance of the relation scores (docs/VISUALIZE.md: it does not reward flat
relations; the total-variation distance of the softmaxes rises with the sharpening training brings)."""

import pytest

from sere_scale.eval.invariance import list_images, measure_invariance
from sere_scale.models.load import load_teacher
from sere_scale.run.train import train
from tests.tiny import tiny_config
from tests.conftest import digits_subset


@pytest.mark.slow
def test_short_training_makes_relations_more_invariant(tmp_path, digits_root):
    data = digits_subset(digits_root, tmp_path / "train", None, 16)
    val = list_images(digits_root / "val", 64)
    common = ("train.max_steps=60", "data.batch_size=32", "model.drop_path=0.0", "train.epochs=20",
              "optim.base_lr=4e-3", "optim.momentum_teacher=0.95", "checkpoint.every_steps=1000",
              "train.log_every=1000")
    res = {}
    for name, extra in (("sere", ()), ("no_sere", ("sere.alpha=0", "sere.beta=0"))):
        run = tmp_path / name
        train(tiny_config(run, data, *common, *extra))
        for rand in ((True, False) if name == "sere" else (False,)):
            cfg, net = load_teacher(run, random_init=rand)
            res["random" if rand else name] = measure_invariance(net.backbone, val, cfg, "train")
    print({k: (round(v["spatial"], 4), round(v["channel"], 4)) for k, v in res.items()})
    r, t, n = res["random"], res["sere"], res["no_sere"]
    # measured (train.seed 1, 2 gave the same picture with margins >= 0.019 / 0.06):
    # spatial 0.547 -> 0.524 (0.525 without SERE), channel 0.316 -> 0.228 (0.295 without SERE)
    assert t["spatial"] < r["spatial"] - 0.01, (r["spatial"], t["spatial"])
    assert t["channel"] < r["channel"] - 0.03, (r["channel"], t["channel"])
    assert t["channel"] < n["channel"] - 0.03, (n["channel"], t["channel"])
