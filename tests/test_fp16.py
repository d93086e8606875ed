"""fp16 with dynamic loss scaling on CPU (CPU autocast supports fp16), every engine, 2 gloo ranks, against
independent expectations:

* the backward runs on the loss times the scale: the gradients backward leaves are ``scale ×`` those the
  optimizer then sees (unscaled before clipping), and the latter equal fp32's within fp16 tolerance;
* an inf gradient injected on one rank (loss finite) skips the step on every rank: student, teacher, centers
  and optimizer state unchanged; the scale follows the documented rule (halved on an inf/NaN gradient,
  doubled after ``train.loss_scale_window`` finite steps; DeepSpeed's own counting differs by one step);
* the scale and its growth counter are in the checkpoint: resuming reproduces the scale and loss curve;
* the fp16 loss curve stays close to fp32's (the same step skipped there by ``train.nonfinite=skip``);
* the EMA still runs in fp32 from the fp32 master weights.

(tests/test_losses.py: under fp16 autocast the losses keep their softmaxes, logits and centers in fp32.)

One 2-rank launch (tests/dist/engines_run.py) holds every training run, and also runs FSDP with
``engine.compile=true`` (tests/test_compile.py covers compile under DDP).
"""

import pytest
import torch

from sere_scale.run.metrics import read_metrics
from tests.test_engines import CURVE_KEYS, overrides, run_jobs
import tests.capability as cap
from tests.conftest import digits_subset

# warmup 0: the student moves from step 1 on. Scale 32 never overflows naturally here (128 can); window 3.
FP16 = ["train.precision=fp16", "train.loss_scale_init=32", "train.loss_scale_window=3", "optim.warmup_epochs=0"]
INIT, WINDOW = 32.0, 3
INF_AT = 4  # forward call 4 = the 2nd micro-batch of step 2 (grad_accum 2), on rank 0 only
SKIPPED = 2
ENGINES = ("ddp", "fsdp", "zero2")


@pytest.fixture(scope="module")
def data48(tmp_path_factory, digits_root):
    return digits_subset(digits_root, tmp_path_factory.mktemp("data48"), 3, 16)


def fp16_jobs(tmp, data48, engines=ENGINES, compiled=True) -> list:
    """The jobs of the one 2-rank launch, for the engines (and compile) this machine supports."""
    skip32 = ["optim.warmup_epochs=0", "train.nonfinite=skip"]
    # fp32 reference: the same step skipped (its loss made NaN), gradients of step 1 saved
    jobs = [{"name": "ref32", "overrides": overrides(tmp / "ref32", data48, "ddp", *skip32), "nan_at": INF_AT,
             "grads_at": 1}]
    for n in engines:
        jobs.append({"name": n, "overrides": overrides(tmp / n, data48, n, *FP16), "inf_grad_at": INF_AT,
                     "snap_calls": [1, 3, 5], "ema": 0.75, **({} if n == "zero2" else {"grads_at": 1})})
        jobs.append({"name": f"{n}_resumed", "overrides": overrides(tmp / f"{n}_resumed", data48, n, *FP16),
                     "resume_from": {"run": str(tmp / n), "step": 3}})
    # FSDP: an inf in rank 1's gradient shard only (after the reduce-scatter), before step 2
    jobs.append({"name": "fsdp_shard_inf", "overrides": overrides(tmp / "fsdp_shard_inf", data48, "fsdp", *FP16,
                                                                  "train.max_steps=3"),
                 "shard_inf_at": {"step": SKIPPED, "rank": 1}})
    if compiled:  # engine.compile under FSDP with activation checkpointing (inductor), fp32: the reference's curve
        jobs.append({"name": "fsdp_compiled", "overrides": overrides(tmp / "fsdp_compiled", data48, "fsdp",
                                                                     *skip32, "engine.compile=true",
                                                                     "model.checkpoint_activations=true"),
                     "nan_at": INF_AT})
    return jobs


def supported_engines() -> tuple:
    """ZeRO's fp16 needs DeepSpeed's accelerator to support fp16; DDP/FSDP use torch's CPU autocast (any CPU)."""
    return tuple(n for n in ENGINES if not (n.startswith("zero") and cap.ds_cpu_problem("fp16")))


def needs(name: str) -> None:
    """Skip a case of an engine (or the compiled job) the launch left out on this machine, with the reason."""
    if name.startswith("zero"):
        cap.require_ds_cpu("fp16")
    if name == "fsdp_compiled":
        cap.require_inductor()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data48):
    tmp = tmp_path_factory.mktemp("fp16")
    return tmp, run_jobs(tmp, 2, fp16_jobs(tmp, data48, supported_engines(), cap.inductor_problem() is None))


def expected_scales(skipped: set, steps: int, deepspeed: bool = False) -> list:
    """The loss scale after each step, from the rules as documented. torch's GradScaler: halve on an inf/NaN
    gradient and reset the count; otherwise count, and double when the count reaches the window. DeepSpeed
    (hysteresis 1): halve on overflow; otherwise double when ``(iteration - last overflow iteration - 1)`` is a
    positive multiple of the window (iterations from 0, the last overflow at -1 initially)."""
    scale, count, last, out = INIT, 0, -1, []
    for it in range(steps):
        if it + 1 in skipped:
            scale, count, last = scale / 2, 0, it
        elif deepspeed:
            stable = it - last - 1
            if stable > 0 and stable % WINDOW == 0:
                scale *= 2
        else:
            count += 1
            if count == WINDOW:
                scale, count = scale * 2, 0
        out.append(scale)
    return out


def flat(d: dict, keys) -> torch.Tensor:
    return torch.cat([d[k].flatten() for k in keys])


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_backward_sees_the_scaled_loss_and_the_optimizer_the_unscaled_gradient(runs, name):
    tmp, _ = runs
    got, ref = torch.load(tmp / name / "grads.pt"), torch.load(tmp / "ref32" / "grads.pt")
    assert not got["skipped"] and got["scale"] == INIT
    keys = sorted(got["seen"])  # the frozen last layer's gradients are dropped before the step
    assert keys == sorted(ref["seen"]) and len(keys) > 40
    raw, seen = flat(got["raw"], keys), flat(got["seen"], keys)
    # unscaled, then clipped to optim.clip_grad (0.3) by the norm of the unscaled gradients
    norm = float(raw.norm()) / INIT
    assert got["norm"] == pytest.approx(norm, rel=1e-5)
    assert got["norm"] > 0.3 * 10  # clipping binds
    torch.testing.assert_close(seen, raw / INIT * (0.3 / (got["norm"] + 1e-6)), rtol=1e-5, atol=1e-9)
    assert float(seen.norm()) == pytest.approx(0.3, rel=1e-5)
    # the same gradients as in fp32 (DDP, no scaling), within fp16 tolerance
    ref_seen = flat(ref["seen"], keys)
    assert float((seen - ref_seen).norm() / ref_seen.norm()) < 1e-2
    assert got["norm"] == pytest.approx(ref["norm"], rel=1e-2)


@pytest.mark.parametrize("name", ENGINES)
def test_an_inf_gradient_on_one_rank_skips_the_step_everywhere_and_halves_the_scale(name, runs):
    needs(name)
    tmp, _ = runs
    # state at the start of step 2 (forward call 3) and of step 3 (call 5): nothing moved
    snaps = torch.load(tmp / name / "snaps.pt", weights_only=False)
    for part in ("student", "teacher", "method", "optimizer"):
        if part not in snaps[3]:
            continue  # FSDP's gathered optimizer state is on rank 0 only, which is the one saved
        a, b = snaps[3][part], snaps[5][part]
        assert set(a) == set(b) and a, (name, part)
        changed = [k for k in a if not torch.equal(a[k], b[k])]
        assert changed == [], (name, part, changed[:5])
    # while step 1 did move the student, the teacher and the centers
    for part in ("student", "teacher", "method"):
        a, b = snaps[1][part], snaps[3][part]
        assert any(not torch.equal(a[k], b[k]) for k in a), (name, part)
    rows = read_metrics(tmp / name)
    assert [r["step"] for r in rows] == list(range(1, 7))  # an overflow step is a step: logged, scheduled
    non_finite = {r["step"] for r in rows if "grad_norm" in r.get("nonfinite", ())}  # inf: null in strict JSON
    assert non_finite == {SKIPPED}  # only the injected one: no natural overflow at these scales
    assert [r["loss_scale"] for r in rows] == expected_scales(non_finite, 6, deepspeed=name == "zero2")
    assert [r["n_overflow"] for r in rows] == [0, 1, 1, 1, 1, 1]


def test_fsdp_skips_on_every_rank_when_one_ranks_gradient_shard_holds_an_inf(runs):
    tmp, rep = runs
    rows = read_metrics(tmp / "fsdp_shard_inf")  # rank 0's log: it saw no inf itself
    assert [r["loss_scale"] for r in rows] == expected_scales({SKIPPED}, 3)
    assert [r["n_overflow"] for r in rows] == [0, 1, 1]
    assert rep["fsdp_shard_inf"]["step"] == 3


@pytest.mark.parametrize("name", ENGINES)
def test_the_loss_scale_is_checkpointed_and_resume_is_exact(name, runs):
    needs(name)
    tmp, rep = runs
    a, b = read_metrics(tmp / name), read_metrics(tmp / f"{name}_resumed")
    assert rep[f"{name}_resumed"]["step"] == 6 and [r["step"] for r in b] == list(range(1, 7))
    # at step 3 the scale (16) and the growth count (1 finite step since the overflow) both differ from a fresh
    # scaler's: a resume that lost either would change the scale at step 5 (torch) or 6 (DeepSpeed)
    assert a[2]["loss_scale"] == INIT / 2
    for ra, rb in zip(a[3:], b[3:]):
        for k in (*CURVE_KEYS, "loss_scale", "n_overflow"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-6, abs=1e-7), (name, ra["step"], k, ra[k], rb[k])


@pytest.mark.parametrize("name", ENGINES)
def test_the_fp16_loss_curve_stays_close_to_fp32(name, runs):
    needs(name)
    tmp, _ = runs
    ref = {r["step"]: r for r in read_metrics(tmp / "ref32") if not r.get("skipped")}  # skipped: logged, flagged
    assert sorted(ref) == [1, 3, 4, 5, 6] and ref[6]["n_skipped"] == 1  # fp32 skipped the same step
    for r in read_metrics(tmp / name):
        if r["step"] == SKIPPED:
            continue
        for k in ("loss", "loss_image", "loss_spatial", "loss_channel"):
            assert r[k] == pytest.approx(ref[r["step"]][k], rel=5e-3), (name, r["step"], k)
        assert r["lr"] == ref[r["step"]]["lr"]


@pytest.mark.parametrize("name", ["fsdp", "zero2"])
def test_the_ema_runs_in_fp32_on_the_master_weights_under_fp16(name, runs):
    needs(name)
    _, rep = runs
    e = rep[name]["ema"]
    assert e["dtypes"] == ["torch.float32"] and e["bitwise_equal"] and e["same_on_all_ranks"], e
    assert e["student_teacher_gap"] > 1e-6
    if name == "zero2":  # DeepSpeed's module holds fp16 copies; the teacher followed the fp32 masters
        assert e["compute_copy_differs"] and not e["equal_to_ema_of_compute_copy"]


def test_compiled_fsdp_with_activation_checkpointing_reproduces_the_eager_curve(runs):
    needs("fsdp_compiled")
    tmp, rep = runs
    a, b = read_metrics(tmp / "ref32"), read_metrics(tmp / "fsdp_compiled")
    assert rep["fsdp_compiled"]["step"] == 6 and [r["step"] for r in b] == [r["step"] for r in a]
    assert [r.get("skipped") for r in a] == [r.get("skipped") for r in b]
    for ra, rb in ((ra, rb) for ra, rb in zip(a, b) if not ra.get("skipped")):
        for k in CURVE_KEYS:
            assert rb[k] == pytest.approx(ra[k], rel=2e-5, abs=1e-7), (ra["step"], k, ra[k], rb[k])


def test_an_fp32_checkpoint_resumes_in_fp16_with_the_configured_scaler(tmp_path, data48):
    from sere_scale.run.train import train
    from tests.tiny import tiny_config
    base = ["model.drop_path=0", "data.batch_size=4", "train.max_steps=2", "checkpoint.every_steps=2"]
    train(tiny_config(tmp_path / "run", data48, *base))
    fp16 = [*base, "train.max_steps=4", "train.precision=fp16", "train.loss_scale_init=16",
            "train.loss_scale_window=2"]
    out = train(tiny_config(tmp_path / "run", data48, *fp16), resume=True)
    rows = read_metrics(tmp_path / "run")
    assert [r.get("loss_scale") for r in rows] == [None, None, 16.0, 32.0]  # fresh scaler, window 2
    # and an fp16 checkpoint resumed with another window keeps its scale and count, with the new window
    fp16[-1] = "train.loss_scale_window=5"
    out = train(tiny_config(tmp_path / "run", data48, *fp16, "train.max_steps=5"), resume=True)
    assert out["engine"].scaler.state_dict()["growth_interval"] == 5
    assert read_metrics(tmp_path / "run")[-1]["loss_scale"] == 32.0


def test_engine_autocast_is_fp16_on_cpu(tmp_path):
    from sere_scale.engine.distributed import DistInfo
    from sere_scale.engine.base import Engine
    from tests.tiny import tiny_config
    for precision, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        eng = Engine(tiny_config(tmp_path, tmp_path, f"train.precision={precision}"), None, None, None, DistInfo())
        with eng.autocast():
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == dtype


def test_loss_scale_settings_are_validated():
    from sere_scale.config.load import ConfigError, load_config
    with pytest.raises(ConfigError, match="train.loss_scale_init"):
        load_config(None, ["train.loss_scale_init=1000"])
    with pytest.raises(ConfigError, match="train.loss_scale_window"):
        load_config(None, ["train.loss_scale_window=0"])
    cfg = load_config(None, ["train.loss_scale_init=1024", "train.loss_scale_window=7"])
    from sere_scale.engine.deepspeed import deepspeed_config
    ds = deepspeed_config(cfg, 1, "fp16")["fp16"]
    assert ds["initial_scale_power"] == 10 and ds["loss_scale_window"] == 7 and ds["hysteresis"] == 1


@pytest.mark.parametrize("has_fp16", [False, True])
def test_the_fp16_gate_follows_the_accelerator_and_leaves_ddp_and_fsdp_in(monkeypatch, tmp_path, has_fp16):
    """The capability reported absent (or present) by DeepSpeed's CPU accelerator: the probe gives the reason
    (or none), the launch keeps DDP/FSDP and drops only ZeRO, and the DeepSpeed engine refuses with a config
    error naming the key before any process group or DeepSpeed engine is made."""
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator
    from sere_scale.engine.capabilities import deepspeed_precision_problem
    from sere_scale.config.load import ConfigError
    from sere_scale.engine.distributed import DistInfo
    from sere_scale.engine.deepspeed import DeepSpeedEngine
    from tests.tiny import tiny_config
    monkeypatch.setattr(CPU_Accelerator, "is_fp16_supported", lambda self: has_fp16)
    reason = deepspeed_precision_problem("fp16", "cpu")
    assert deepspeed_precision_problem("fp32", "cpu") is None
    if has_fp16:
        assert reason is None
        return
    assert "fp16" in reason and "_is_mkldnn_fp16_supported" in reason
    monkeypatch.setattr(cap, "ds_cpu_problem", lambda precision: reason)
    names = [j["name"] for j in fp16_jobs(tmp_path, tmp_path, supported_engines(), compiled=False)]
    assert names == ["ref32", "ddp", "ddp_resumed", "fsdp", "fsdp_resumed", "fsdp_shard_inf"]
    with pytest.raises(pytest.skip.Exception, match="fp16 in DeepSpeed's CPU accelerator.*mkldnn"):
        needs("zero2")
    needs("ddp")  # not skipped
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    import deepspeed.accelerator.real_accelerator as ra
    monkeypatch.setattr(ra, "ds_accelerator", CPU_Accelerator())
    cfg = tiny_config(tmp_path, tmp_path, "engine.backend=deepspeed", "train.precision=fp16")
    with pytest.raises(ConfigError, match="train.precision.*does not support fp16"):
        DeepSpeedEngine(cfg, None, None, None, DistInfo())
