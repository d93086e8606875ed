"""FSDP2 and DeepSpeed ZeRO 1/2/3 engines on CPU (gloo, tiny ViT), against independent references:

* the loss curve of every backend equals DDP's in fp32 (gradient accumulation on, the last layer unfreezing
  at step 3, activation checkpointing on for FSDP and ZeRO-3);
* the EMA update of sharded teachers equals, bitwise in fp32, the EMA of the gathered parameters, at world
  sizes 2 and 1, and under bf16 DeepSpeed it follows the fp32 master weights, not the bf16 copies;
* an FSDP checkpoint written by 2 ranks loads at 1 rank with every tensor equal and training continues;
* kill -9 then ``--resume`` reproduces the uninterrupted curve (FSDP, ZeRO-3); SIGTERM on one rank (SIGUSR1
  on the other) makes every rank checkpoint and exit 124, ``slurm/train_srun.sbatch`` requeues the job, and
  resuming reproduces the curve (ZeRO-2);
* the teacher readers rebuild the full teacher of every backend's checkpoint without processes.

Launchers: torchrun; the Slurm template ``slurm/train_srun.sbatch`` with ``srun``/``scontrol`` stubbed (ranks
from SLURM_* variables); ``accelerate launch`` with ``configs/accelerate/single_node.yaml``.

Distributed work is grouped into few launches (each costs seconds): one 2-rank torchrun for all backends,
one 1-rank torchrun, and the kill/preempt/resume launches.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sere_scale.engine.checkpoint import find_latest
from sere_scale.run.metrics import read_metrics
import tests.capability as cap
from tests.conftest import ROOT, subprocess_env
from tests.tiny import TINY

WORKER = ROOT / "tests" / "dist" / "engines_run.py"
# 48 images, 4 per micro-batch, 2 micro-batches per step: 2 ranks → 3 steps per epoch; the last layer is
# frozen for epoch 0 (steps 0-2) and trains from step 3 on; checkpoints at steps 3 and 6.
COMMON = ["model.drop_path=0", "data.batch_size=4", "train.grad_accum=2", "train.epochs=2", "train.max_steps=6",
          "checkpoint.every_steps=3", "optim.freeze_last_layer=1", "model.dino_vit=true"]
BACKENDS = {
    "ddp": [],
    "fsdp": ["engine.backend=fsdp", "model.checkpoint_activations=true"],
    "fsdp_hybrid": ["engine.backend=fsdp", "engine.fsdp_strategy=hybrid", "engine.fsdp_node_size=1"],
    "fsdp_grad_op": ["engine.backend=fsdp", "engine.fsdp_strategy=grad_op", "train.max_steps=3"],
    "zero1": ["engine.backend=deepspeed", "engine.zero_stage=1"],
    "zero2": ["engine.backend=deepspeed", "engine.zero_stage=2"],
    "zero3": ["engine.backend=deepspeed", "engine.zero_stage=3", "model.checkpoint_activations=true"],
}
# short runs for EMA checks: one step at a large lr, so that student and teacher differ clearly
SHORT = ["train.max_steps=1", "optim.warmup_epochs=0", "optim.base_lr=0.1"]
BF16 = {
    "fsdp_bf16": ["engine.backend=fsdp", "train.precision=bf16", *SHORT],
    "zero2_bf16": ["engine.backend=deepspeed", "engine.zero_stage=2", "train.precision=bf16", *SHORT],
    "zero3_bf16": ["engine.backend=deepspeed", "engine.zero_stage=3", "train.precision=bf16", *SHORT],
}
CURVE_KEYS = ("loss", "loss_image", "loss_spatial", "loss_channel", "grad_norm", "lr")


def env():
    # the DeepSpeed CPU communication op compiles once (~20 s) into TORCH_EXTENSIONS_DIR; reuse the venv's
    return subprocess_env(DS_ACCELERATOR="cpu",
                          TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                              os.path.join(sys.prefix, "torch_extensions")))


def overrides(out_dir, data, name, *extra):
    base = {**BACKENDS, **BF16}[name]
    return [*TINY, *COMMON, f"output_dir={out_dir}", f"data.path={data}", *base, *extra]


def torchrun(nproc, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def accelerate(nproc, *args):
    """``accelerate launch`` with the project's single-node config (MULTI_GPU: torchrun-like, CPU works)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs" / "accelerate" / "single_node.yaml"), "--num_processes", str(nproc), *args]


def run_jobs(tmp: Path, nproc: int, jobs: list, timeout=600, launcher=torchrun) -> dict:
    jf, report = tmp / f"jobs_{nproc}_{len(jobs)}.json", tmp / f"report_{nproc}_{len(jobs)}.json"
    jf.write_text(json.dumps(jobs))
    res = subprocess.run(launcher(nproc, str(WORKER), str(report), str(jf)), env=env(), capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return json.loads(report.read_text())


def assert_same_curve(a_dir, b_dir, rel):
    """Run b logged steps 1..n, and each equals run a's (n = b's length)."""
    a, b = read_metrics(a_dir), read_metrics(b_dir)
    n = len(b)
    assert n > 0 and [r["step"] for r in a][:n] == list(range(1, n + 1))
    assert [r["step"] for r in b] == list(range(1, n + 1)), (b_dir, [r["step"] for r in b])
    for ra, rb in zip(a[:n], b[:n]):
        for k in CURVE_KEYS:
            assert rb[k] == pytest.approx(ra[k], rel=rel, abs=1e-7), (str(b_dir), ra["step"], k, ra[k], rb[k])


@pytest.fixture(scope="module")
def two_rank(tmp_path_factory, data48):
    """One 2-rank launch: every backend in fp32 (reference state saved, EMA checked), bf16 EMA checks."""
    tmp = tmp_path_factory.mktemp("two_rank")
    jobs = [{"name": n, "overrides": overrides(tmp / n, data48, n), "ref": True, "ema": 0.75} for n in BACKENDS]
    jobs += [{"name": n, "overrides": overrides(tmp / n, data48, n), "ema": 0.75} for n in BF16
             if not (n.startswith("zero") and cap.ds_cpu_problem("bf16"))]  # ZeRO bf16 where DeepSpeed has it
    return tmp, run_jobs(tmp, 2, jobs)


def test_every_backend_reproduces_the_ddp_loss_curve_in_fp32(two_rank):
    tmp, rep = two_rank
    rows = read_metrics(tmp / "ddp")
    assert len(rows) == 6 and all(r["grad_norm"] > 0 for r in rows)
    assert rows[3]["epoch"] == pytest.approx(1.0)  # steps 4-6: the last layer trains
    for name in BACKENDS:
        if name != "ddp":
            assert_same_curve(tmp / "ddp", tmp / name, rel=2e-5)
        assert rep[name]["step"] == (3 if name == "fsdp_grad_op" else 6)


@pytest.mark.parametrize("name", [n for n in {**BACKENDS, **BF16} if n != "ddp"])
def test_sharded_ema_is_bitwise_the_ema_of_gathered_fp32_weights_at_2_ranks(two_rank, name):
    if name.startswith("zero") and name.endswith("bf16"):
        cap.require_ds_cpu("bf16")
    _, rep = two_rank
    e = rep[name]["ema"]
    assert e["dtypes"] == ["torch.float32"]
    assert e["student_teacher_gap"] > 1e-5  # the update is not trivial
    assert e["bitwise_equal"], e
    assert e["same_on_all_ranks"]
    if name.startswith("zero") and name.endswith("bf16"):
        # DeepSpeed's module holds bf16 copies; the teacher followed the fp32 masters instead
        assert e["compute_copy_differs"] and not e["equal_to_ema_of_compute_copy"]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, data48, two_rank):
    """One 1-rank launch: EMA checks of every sharded backend, and the 2-rank FSDP checkpoint resumed."""
    tmp = tmp_path_factory.mktemp("one_rank")
    src, _ = two_rank
    jobs = [{"name": n, "overrides": overrides(tmp / n, data48, n, *SHORT), "ema": 0.75}
            for n in ("fsdp", "zero1", "zero2", "zero3")]
    # train.nonfinite=skip: the 2nd micro-batch of step 2 (accumulation 2) or the loss of step 3 is NaN
    skip = ["train.nonfinite=skip"]
    for n, extra, nan_at in (("ddp", [], 4), ("fsdp", [], 4), ("ddp", ["train.grad_accum=1"], 3),
                             ("zero2", ["train.grad_accum=1"], 3), ("zero3", ["train.grad_accum=1"], 3)):
        key = f"skip_{n}_accum{2 if not extra else 1}"
        jobs.append({"name": key, "overrides": overrides(tmp / key, data48, n, *skip, *extra), "nan_at": nan_at})
    jobs.append({"name": "fsdp_from_2", "reload": str(src / "fsdp"),
                 "overrides": overrides(tmp / "fsdp_from_2", data48, "fsdp", "train.epochs=3",
                                        "train.max_steps=8")})
    return tmp, run_jobs(tmp, 1, jobs)


@pytest.mark.parametrize("name", ["fsdp", "zero1", "zero2", "zero3"])
def test_sharded_ema_is_bitwise_the_ema_of_gathered_fp32_weights_at_1_rank(one_rank, name):
    _, rep = one_rank
    assert rep["world"] == 1
    e = rep[name]["ema"]
    assert e["bitwise_equal"] and e["student_teacher_gap"] > 1e-4, e


def test_a_skipped_nonfinite_step_leaves_the_same_state_as_under_ddp(one_rank):
    tmp, _ = one_rank
    for ref, other, skipped in (("skip_ddp_accum2", "skip_fsdp_accum2", 2), ("skip_ddp_accum1", "skip_zero2_accum1", 3),
                                ("skip_ddp_accum1", "skip_zero3_accum1", 3)):
        a, b = read_metrics(tmp / ref), read_metrics(tmp / other)
        for rows in (a, b):  # the skipped step is logged too, flagged (its losses null)
            assert [r["step"] for r in rows if r.get("skipped")] == [skipped], (other, rows)
        a, b = [r for r in a if not r.get("skipped")], [r for r in b if not r.get("skipped")]
        logged = [s for s in range(1, 7) if s != skipped]
        assert [r["step"] for r in a] == logged and [r["step"] for r in b] == logged, (other, b)
        assert a[-1]["n_skipped"] == b[-1]["n_skipped"] == 1
        for ra, rb in zip(a, b):
            for k in CURVE_KEYS:
                assert rb[k] == pytest.approx(ra[k], rel=2e-5, abs=1e-7), (other, ra["step"], k, ra[k], rb[k])


def test_fsdp_checkpoint_of_2_ranks_resumes_at_1_rank(one_rank):
    tmp, rep = one_rank
    r = rep["fsdp_from_2"]["reload"]
    for part in ("student", "teacher", "method", "optimizer"):
        assert r[part]["keys_equal"] and r[part]["n"] > 0 and r[part]["mismatch"] == [], (part, r[part])
    assert r["param_groups_equal"]
    assert r["train_state"]["step"] == 6 and r["train_state"]["epoch"] == 2
    assert rep["fsdp_from_2"]["step"] == 8
    rows = read_metrics(tmp / "fsdp_from_2")
    assert [x["step"] for x in rows] == list(range(1, 9))
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in rows[6:])


def test_teacher_readers_rebuild_the_full_teacher_of_every_backend(two_rank):
    from sere_scale.models.load import load_teacher, read_teacher_state
    tmp, _ = two_rank
    for name in ("fsdp", "fsdp_hybrid", "zero1", "zero2", "zero3"):
        ck = find_latest(tmp / name)
        ref = torch.load(tmp / name / "ref.pt", weights_only=False)["teacher"]
        got = read_teacher_state(ck)
        for k, v in ref.items():
            assert torch.equal(got[k].float(), v), (name, k)
        _, net = load_teacher(tmp / name)  # strict load into a fresh network: buffers present too
        assert torch.equal(dict(net.named_parameters())["backbone.vit.cls_token"], ref["backbone.vit.cls_token"])



def test_init_from_a_checkpoint_folder_of_every_backend_gives_its_network(two_rank):
    """``model.init_from=run:STEP_FOLDER`` (any backend, saved by 2 ranks) loads the saved teacher — heads too —
    into a new run's student and teacher (models/init_from.py)."""
    from sere_scale.models.init_from import init_from
    from sere_scale.models.load import load_run_config
    from sere_scale.run.startup import build_model
    tmp, _ = two_rank
    for name in ("ddp", "fsdp", "fsdp_hybrid", "zero1", "zero2", "zero3"):
        ck = find_latest(tmp / name)
        ref = torch.load(tmp / name / "ref.pt", weights_only=False)["teacher"]
        cfg = load_run_config(tmp / name)
        student, teacher, _ = build_model(cfg)
        report = init_from(f"run:{ck}", cfg, student, teacher)
        assert report["kept_random"] == [] and report["missing_backbone"] == [], (name, report)
        s, t = student.state_dict(), teacher.state_dict()
        for k, v in ref.items():
            assert torch.equal(s[k].float(), v) and torch.equal(t[k].float(), v), (name, k)


def test_step_folders_convert_with_deepspeed_zero_to_fp32_and_torch_dcp_to_torch_save(two_rank, tmp_path):
    """The tools' own documented commands, no flags: DeepSpeed's ``zero_to_fp32.py STEP OUT`` (the script
    DeepSpeed copies into the step folder) gives the fp32 student; torch's ``format_utils
    dcp_to_torch_save`` gives student, teacher and optimizer of an FSDP step. Our student readers agree."""
    from sere_scale.models.load import read_state
    tmp, _ = two_rank
    for name in ("zero2", "zero3", "fsdp"):
        ck = find_latest(tmp / name)
        ref = torch.load(tmp / name / "ref.pt", weights_only=False)
        out = tmp_path / name
        if name.startswith("zero"):
            assert (ck / "latest").read_text().strip() == "deepspeed"
            r = subprocess.run([sys.executable, str(ck / "zero_to_fp32.py"), str(ck), str(out)],
                               env=env(), capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
            student = torch.load(out / "pytorch_model.bin", weights_only=False)
        else:
            r = subprocess.run([sys.executable, "-m", "torch.distributed.checkpoint.format_utils", "dcp_to_torch",
                                str(ck / "dcp"), str(out) + ".pt"], env=env(), capture_output=True, text=True,
                               timeout=300)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
            full = torch.load(str(out) + ".pt", weights_only=False)
            assert {"student", "teacher", "optimizer"} <= set(full)
            for k, v in ref["teacher"].items():
                assert torch.equal(full["teacher"][k].float(), v), (name, k)
            student = full["student"]
        params = {k for k in ref["student"] if "backbone.vit.blocks.0" in k}
        assert params and "backbone.vit.cls_token" in student
        for k, v in ref["student"].items():
            if k in student or k in params:
                assert torch.equal(student[k].float(), v), (name, k)
        mine = read_state(ck, "student")
        for k, v in ref["student"].items():
            assert torch.equal(mine[k].float(), v), (name, k)

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_after_first_checkpoint(cmd, run_dir: Path, log: Path, timeout=300) -> None:
    with log.open("w") as f:
        p = subprocess.Popen(cmd, env=env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.time()
        try:
            while not (run_dir / "checkpoints" / "latest").exists():
                assert p.poll() is None, log.read_text()[-4000:]
                assert time.time() - t0 < timeout, "no checkpoint in time"
                time.sleep(0.05)
        finally:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def test_kill9_and_sigterm_then_resume_reproduce_the_uninterrupted_curve(tmp_path, data48, two_rank):
    ref_root, _ = two_rank
    cli = ["-m", "sere_scale", "train"]
    # kill -9 the whole torchrun process group once the step-3 checkpoint exists
    for name in ("fsdp", "zero3"):
        run = tmp_path / name
        _kill_after_first_checkpoint(torchrun(2, *cli, *overrides(run, data48, name)), run, tmp_path / f"{name}.log")
        assert find_latest(run).name == "step_00000003"
        assert read_metrics(run)[-1]["step"] < 6  # really interrupted
    # slurm/train_srun.sbatch (srun and scontrol stubbed: two tasks here, ranks from SLURM_* variables);
    # SIGTERM to rank 1 and SIGUSR1 (the template's --signal) to rank 0 once training runs
    run, stub_log = tmp_path / "zero2", tmp_path / "stub.log"
    e = env()
    e.update(PATH=f"{ROOT / 'tests' / 'dist' / 'slurm_stub'}{os.pathsep}{e['PATH']}", STUB_LOG=str(stub_log),
             SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="localhost",
             MASTER_PORT=str(_free_port()), PYTHON=sys.executable)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        e.pop(k, None)
    job = subprocess.Popen(["bash", str(ROOT / "slurm" / "train_srun.sbatch"), "/dev/null",
                            *overrides(run, data48, "zero2")], env=e, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while not read_metrics(run):
        assert job.poll() is None and time.time() - t0 < 300, job.communicate()[0][-4000:]
        time.sleep(0.05)
    pids = {int(ln.split()[1]): int(ln.split()[2]) for ln in stub_log.read_text().splitlines()
            if ln.startswith("pid")}
    os.kill(pids[1], signal.SIGTERM)
    os.kill(pids[0], signal.SIGUSR1)
    out = job.communicate(timeout=300)[0]
    lines = stub_log.read_text().splitlines()
    assert sorted(ln for ln in lines if ln.startswith("rc")) == ["rc 0 124", "rc 1 124"], out[-4000:]
    assert "scontrol requeue 4242" in lines and job.returncode == 0, out[-4000:]
    stopped = find_latest(run)
    assert json.loads((stopped / "meta.json").read_text())["backend"] == "deepspeed"
    preempted_at = read_metrics(run)[-1]["step"]
    assert stopped.name == f"step_{preempted_at:08d}" and preempted_at < 6
    assert (run / "REQUEUE").read_text().strip() == str(preempted_at)  # for launchers that hide exit codes
    # one launch, by `accelerate launch` with configs/accelerate/single_node.yaml, resumes all three
    jobs = [{"name": n, "overrides": overrides(tmp_path / n, data48, n), "resume": True}
            for n in ("fsdp", "zero3", "zero2")]
    rep = run_jobs(tmp_path, 2, jobs, launcher=accelerate)
    assert not (run / "REQUEUE").exists()
    for n in ("fsdp", "zero3", "zero2"):
        assert rep[n]["step"] == 6
        assert len(read_metrics(tmp_path / n)) == 6
        assert_same_curve(ref_root / n, tmp_path / n, rel=1e-6)


def test_deepspeed_config_is_generated_from_ours_and_merged_with_the_user_json(tmp_path):
    from sere_scale.config.load import ConfigError
    from sere_scale.engine.deepspeed import deepspeed_config
    from tests.tiny import tiny_config
    cfg = tiny_config(tmp_path, tmp_path, "engine.backend=deepspeed", "engine.zero_stage=3", "train.grad_accum=4",
                      "optim.clip_grad=0.3")
    ds = deepspeed_config(cfg, 8, "bf16")
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 8 * 4 * 8 and ds["gradient_clipping"] == 0.3
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["communication_data_type"] == "fp32"
    assert ds["zero_optimization"]["stage"] == 3 and "optimizer" not in ds and "scheduler" not in ds
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "gradient_clipping": 1.0}))
    cfg.engine.deepspeed_config = str(user)
    ds = deepspeed_config(cfg, 8, "fp16")
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000 and ds["zero_optimization"]["stage"] == 3
    assert ds["gradient_clipping"] == 1.0 and ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0
    user.write_text(json.dumps({"optimizer": {"type": "AdamW"}}))
    with pytest.raises(ConfigError, match="optimizer"):
        deepspeed_config(cfg, 8, "fp32")


def test_cli_tolerates_the_local_rank_argument_of_launchers(monkeypatch):
    from sere_scale.cli import strip_local_rank
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert strip_local_rank(["--local_rank=3", "train", "a=1"]) == ["train", "a=1"]
    assert os.environ["LOCAL_RANK"] == "3"
    assert strip_local_rank(["train", "--local-rank", "5", "--resume"]) == ["train", "--resume"]
    assert os.environ["LOCAL_RANK"] == "3"  # the launcher's environment wins
