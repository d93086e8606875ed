import math

import numpy as np
import pytest
import torch

from sere_scale.config.load import load_config
from sere_scale.engine.distributed import DistInfo
from sere_scale.engine.ddp import DDPEngine
from sere_scale.engine.params import param_groups
from sere_scale.method.sere_method import SEREMethod
from sere_scale.models.network import build_student_teacher
from sere_scale.method.schedules import build_schedules
from tests.tiny import TINY


def test_schedules_follow_the_recipe():
    cfg = load_config(None, ["data.batch_size=64", "train.grad_accum=2", "optim.base_lr=5e-4", "optim.min_lr=1e-6",
                             "optim.warmup_epochs=10", "train.epochs=100", "image_loss.warmup_teacher_temp_epochs=30"])
    sch = build_schedules(cfg, steps_per_epoch=50, world_size=4)
    peak = 5e-4 * 64 * 4 * 2 / 256
    assert sch.lr_at(0) == 0 and sch.lr_at(250) == pytest.approx(peak * 250 / 499)
    assert sch.lr_at(499) == pytest.approx(peak) and sch.lr_at(500) == pytest.approx(peak)
    assert sch.lr_at(5000) == pytest.approx(1e-6)
    mid = 500 + (5000 - 500) // 2
    assert sch.lr_at(mid) == pytest.approx(1e-6 + (peak - 1e-6) / 2)
    assert sch.wd_at(0) == pytest.approx(0.04) and sch.wd_at(5000) == pytest.approx(0.4)
    assert sch.momentum_at(0) == pytest.approx(0.996) and sch.momentum_at(5000) == pytest.approx(1.0)
    temps = [sch.at(e * 50)["teacher_temp"] for e in (0, 1, 29, 30, 99)]
    assert temps[0] == pytest.approx(0.04) and temps[1] == pytest.approx(0.04 + 0.03 / 29)
    assert temps[2] == pytest.approx(0.07) and temps[3] == pytest.approx(0.07) and temps[4] == pytest.approx(0.07)


def _published_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0,
                                start_warmup_value=0):
    """DINO/iBOT's utils.cosine_scheduler, written out in numpy: a linspace warmup that ends on the base value,
    then a cosine over the remaining iterations."""
    warmup = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, schedule))


@pytest.mark.parametrize("warmup_epochs,steps_per_epoch,epochs", [(10, 7, 30), (1, 1, 5), (2, 13, 2), (0, 5, 3)])
def test_lr_wd_momentum_are_the_published_schedules(warmup_epochs, steps_per_epoch, epochs):
    cfg = load_config(None, ["data.batch_size=256", "optim.base_lr=5e-4", "optim.min_lr=1e-6",
                             f"optim.warmup_epochs={warmup_epochs}", f"train.epochs={epochs}"])
    sch = build_schedules(cfg, steps_per_epoch=steps_per_epoch, world_size=1)
    o = cfg.optim
    lr = _published_cosine_scheduler(5e-4, 1e-6, epochs, steps_per_epoch, warmup_epochs)
    wd = _published_cosine_scheduler(o.weight_decay, o.weight_decay_end, epochs, steps_per_epoch)
    mom = _published_cosine_scheduler(o.momentum_teacher, 1.0, epochs, steps_per_epoch)
    steps = range(epochs * steps_per_epoch)
    np.testing.assert_allclose([sch.lr_at(i) for i in steps], lr, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose([sch.wd_at(i) for i in steps], wd, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose([sch.momentum_at(i) for i in steps], mom, rtol=1e-12, atol=1e-15)


def _engine():
    cfg = load_config(None, [*TINY, "data.path=unused"])
    torch.manual_seed(0)
    s, t = build_student_teacher(cfg)
    m = SEREMethod(cfg, s.backbone.num_heads)
    return cfg, s, t, DDPEngine(cfg, s, t, m, DistInfo())


def test_teacher_starts_equal_and_ema_follows_the_formula():
    cfg, s, t, eng = _engine()
    for (n, a), (_, b) in zip(s.named_parameters(), t.named_parameters()):
        assert torch.equal(a, b), n
    with torch.no_grad():
        for p in s.parameters():
            p.add_(torch.randn_like(p))
    before = {n: p.clone().double() for n, p in t.named_parameters()}
    eng.ema_update(0.9)
    for n, p in t.named_parameters():
        expected = 0.9 * before[n] + 0.1 * dict(s.named_parameters())[n].double()
        assert torch.allclose(p.double(), expected, atol=1e-6), n
    assert not any(p.requires_grad for p in t.parameters())


def test_no_weight_decay_on_biases_and_1d_params():
    cfg, s, t, eng = _engine()
    reg, noreg = param_groups(s)
    names = {id(p): n for n, p in s.named_parameters()}
    assert all(p.ndim > 1 and not names[id(p)].endswith(".bias") for p in reg["params"])
    assert any(names[id(p)].endswith("norm1.weight") for p in noreg["params"])
    eng.set_lr_wd(eng.optimizer, 0.1, 0.3)
    assert [g["weight_decay"] for g in eng.optimizer.param_groups] == [0.3, 0.0]


def test_last_layer_is_frozen_while_requested():
    cfg, s, t, eng = _engine()
    last = s.image_head.last_layer.weight_v
    for p in s.parameters():
        p.grad = torch.ones_like(p)
    before = last.detach().clone()
    eng.step(1e-2, 0.0, freeze_last_layer=True)
    assert torch.equal(last, before)
    for p in s.parameters():
        p.grad = torch.ones_like(p)
    eng.step(1e-2, 0.0, freeze_last_layer=False)
    assert not torch.equal(last, before)


def test_gradient_clipping_uses_the_global_norm():
    cfg, s, t, eng = _engine()
    params = [p for p in s.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.full_like(p, 2.0)
    n = sum(p.numel() for p in params)
    norm = eng.step(0.0, 0.0, freeze_last_layer=False)
    assert float(norm) == pytest.approx(2.0 * math.sqrt(n), rel=1e-4)
