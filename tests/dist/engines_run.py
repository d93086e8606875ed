"""Run under torchrun (any world size): a list of jobs, one after another in the same process group, each a
training run of some backend followed by checks against independent references. Rank 0 writes a JSON report.

``engines_run.py REPORT JOBS_JSON``; each job is a dict:
  name, overrides (config overrides, output_dir included), resume (bool),
  ref (bool: after training, save the full fp32 student/teacher/optimizer/center state to output_dir/ref.pt
       through gathering APIs: FSDP ``full_tensor``/``get_state_dict(full_state_dict)``, DeepSpeed
       ``safe_get_full_fp32_param`` / ``GatheredParameters``),
  ema (momentum: after training, check shard-local EMA == EMA of the gathered fp32 parameters, bitwise),
  reload (a run folder written at another world size: rebuild the engine, load its latest checkpoint and
          compare the full state with that run's ref.pt bitwise) — then train as usual (resume from a copy),
  nan_at (the loss of that forward call, counted from 1, is made NaN: with train.nonfinite=skip),
  nan_input_at (list of forward calls, from 1, whose crops are NaN: the forward itself goes non-finite,
                BatchNorm running statistics included; on rank ``nan_rank`` only, if given),
  inf_grad_at (the loss of that forward call on rank 0 keeps its value but back-propagates inf: the gradients
               overflow, as an fp16 overflow would),
  snap_calls (forward calls at whose start the full state, as ``full_state``, is saved to output_dir/snaps.pt),
  grads_at (optimizer step, counted from 1, whose gradients are saved to output_dir/grads.pt, gathered and
            keyed by parameter name: ``raw`` as backward left them, before the engine's step (scaled under
            fp16), ``seen`` as the optimizer's step sees them (after unscaling and clipping), ``norm`` the
            engine's returned norm and ``scale`` the loss scale then; DDP and FSDP),
  shard_inf_at ({"step": n, "rank": r}: before optimizer step n, rank r sets one element of its local gradient
                shard to inf; DDP and FSDP),
  resume_from ({"run": folder, "step": n}: copy that run, point its latest checkpoint at step n, resume),
  raises (a substring of the error training must raise: reported as ``{"raised": text}``, the next job runs).
"""
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from sere_scale.engine.checkpoint import find_latest
from sere_scale.config.load import load_config
from sere_scale.engine.distributed import init_distributed
from sere_scale.engine import build_engine
from sere_scale.engine.base import ensure_process_group
from sere_scale.method.sere_method import SEREMethod
from sere_scale.run.startup import build_parts
from sere_scale.run.train import train


# ------------------------------------------------------------------------------- gathering (references)
def full_student_fp32(eng) -> dict:
    """The student's fp32 master weights, gathered (every rank)."""
    if eng.name == "fsdp":
        return {n: p.full_tensor().detach().clone() for n, p in eng.student_module.named_parameters()}
    if eng.name == "deepspeed":
        from deepspeed.utils import safe_get_full_fp32_param
        return {n: safe_get_full_fp32_param(p).detach().clone() for n, p in eng.student_module.named_parameters()}
    return {n: p.detach().clone() for n, p in eng.student_module.named_parameters()}


def full_student_compute(eng) -> dict:
    """The student's weights as the module holds them (bf16 copies under DeepSpeed bf16), gathered."""
    if eng.name == "deepspeed" and eng.stage == 3:
        import deepspeed
        params = list(eng.student_module.named_parameters())
        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return {n: p.detach().clone() for n, p in params}
    if eng.name == "fsdp":
        return full_student_fp32(eng)
    return {n: p.detach().clone() for n, p in eng.student_module.named_parameters()}


def full_teacher_fp32(eng) -> dict:
    """The teacher's fp32 parameters, gathered (every rank)."""
    t = eng.teacher_module
    if eng.name == "fsdp":
        return {n: p.full_tensor().detach().clone() for n, p in t.named_parameters()}
    if eng.name == "deepspeed" and eng.stage == 3:
        params = list(t.named_parameters())
        if params[0][1].ds_tensor.dtype == torch.float32:  # the module's own partitions are the fp32 state
            import deepspeed
            with deepspeed.zero.GatheredParameters([p for _, p in params]):
                return {n: p.detach().clone() for n, p in params}
        sd = eng.teacher_state_dict()  # bf16 module: the fp32 partitions, gathered
        return {n: sd[n].to(eng.device) for n, _ in params}
    return {n: p.detach().clone() for n, p in t.named_parameters()}


def same_on_all_ranks(tensors: dict) -> bool:
    ok = True
    for v in tensors.values():
        hi, lo = v.detach().float().clone(), v.detach().float().clone()
        dist.all_reduce(hi, dist.ReduceOp.MAX)
        dist.all_reduce(lo, dist.ReduceOp.MIN)
        ok &= bool(torch.equal(hi, lo))
    return ok


def ema_check(eng, m: float) -> dict:
    S, T = full_student_fp32(eng), full_teacher_fp32(eng)
    C = full_student_compute(eng)
    eng.ema_update(m)
    T2 = full_teacher_fp32(eng)
    assert set(T2) == set(S), "teacher and student parameter names differ"
    ref = {n: T[n] * m + S[n] * (1.0 - m) for n in T}  # independent reference on the gathered tensors
    from_compute = {n: T[n] * m + C[n].float() * (1.0 - m) for n in T}
    return {
        "n_params": len(T),
        "dtypes": sorted({str(v.dtype) for v in T2.values()}),
        "bitwise_equal": all(torch.equal(T2[n], ref[n]) for n in T),
        "max_abs_diff": max(float((T2[n] - ref[n]).abs().max()) if T2[n].numel() else 0.0 for n in T),
        "student_teacher_gap": max(float((S[n] - T[n]).abs().max()) if T[n].numel() else 0.0 for n in T),
        "compute_copy_differs": any(not torch.equal(C[n].float(), S[n]) for n in S),
        "equal_to_ema_of_compute_copy": all(torch.equal(T2[n], from_compute[n]) for n in T),
        "same_on_all_ranks": same_on_all_ranks(T2),
    }


def full_state(eng) -> dict:
    """Student, teacher (fp32), optimizer moments keyed by parameter name, centers: full, on CPU."""
    out = {"student": {k: v.cpu() for k, v in full_student_fp32(eng).items()},
           "teacher": {k: v.cpu() for k, v in full_teacher_fp32(eng).items()},
           "method": {k: v.cpu().clone() for k, v in eng.method.state_dict().items()}}
    if eng.name == "ddp":
        names = {id(p): n for n, p in eng.student_module.named_parameters()}
        out["optimizer"] = {f"{names[id(p)]}.{k}": torch.as_tensor(v).float().cpu().clone()
                            for p, st in eng.optimizer.state.items() for k, v in st.items()}
    if eng.name == "deepspeed":
        # rank 0's flat fp32 partitions: AdamW moments and step counts
        zero = eng.ds.optimizer
        flats = (zero.fp32_partitioned_groups_flat if eng.stage == 3 else zero.single_partition_of_fp32_groups)
        out["optimizer"] = {f"flat{i}.{k}": torch.as_tensor(v).float().cpu() for i, f in enumerate(flats)
                            for k, v in zero.optimizer.state.get(f, {}).items()}
    if eng.name == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        _, osd = get_state_dict(eng.student_module, eng.optimizer,
                                options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if osd:  # rank 0 only (cpu_offload)
            out["optimizer"] = {f"{n}.{k}": (v.cpu() if torch.is_tensor(v) else torch.tensor(v))
                                for n, st in osd["state"].items() for k, v in st.items()}
            out["param_groups"] = [{k: v for k, v in g.items() if k != "params"} for g in osd["param_groups"]]
    return out


def compare_states(a: dict, b: dict) -> dict:
    res = {}
    for part in ("student", "teacher", "method", "optimizer"):
        if part not in a:
            continue
        keys_equal = set(a[part]) == set(b[part])
        bad = [k for k in a[part] if k in b[part] and not torch.equal(a[part][k], b[part][k])]
        res[part] = {"keys_equal": keys_equal, "n": len(a[part]), "mismatch": bad[:5]}
    if "param_groups" in a:
        res["param_groups_equal"] = a["param_groups"] == b["param_groups"]
    return res


# ------------------------------------------------------------------------------- probes (fp16 tests)
class InfGrad(torch.autograd.Function):
    """Identity forward; the backward sends inf (an overflowing gradient) into the graph."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def full_grads(eng) -> dict:
    """The student's gradients (fp32), gathered, keyed by parameter name; DDP and FSDP."""
    out = {}
    for n, p in eng.student_module.named_parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            out[n] = g.detach().float().cpu().clone()
    return out


def instrument(eng, job, info, out_dir: Path) -> None:
    """Wraps ``eng.step`` and the optimizer to save the gradients of step ``grads_at`` (every rank gathers), and
    to make one element of this rank's gradient shard inf before step ``shard_inf_at["step"]`` on rank
    ``shard_inf_at["rank"]`` (after the reduction: no other rank sees it)."""
    at, shard_inf = job.get("grads_at"), job.get("shard_inf_at")
    if not at and not shard_inf:
        return
    calls, rec = {"n": 0}, {}
    orig = eng.step

    def pre_hook(optimizer, args, kwargs):
        if calls["n"] == at:
            rec["seen"] = full_grads(eng)

    eng.optimizer.register_step_pre_hook(pre_hook)

    def step(*a, **k):
        calls["n"] += 1
        if shard_inf and calls["n"] == shard_inf["step"] and info.rank == shard_inf["rank"]:
            for p in eng.student_module.parameters():
                g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                if g is not None and g.numel():
                    g.view(-1)[0] = float("inf")
                    break
        if calls["n"] == at:
            rec["raw"], rec["scale"] = full_grads(eng), eng.loss_scale()
        norm = orig(*a, **k)
        if calls["n"] == at:
            rec["norm"], rec["skipped"] = float(norm), eng.step_skipped
            if info.is_main:
                torch.save(rec, out_dir / "grads.pt")
        return norm
    eng.step = step


def resume_copy(src: Path, dst: Path, step: int, info) -> None:
    """``dst``: a copy of run ``src`` whose latest checkpoint is the one of ``step`` (later ones removed)."""
    if info.is_main:
        shutil.copytree(src, dst)
        ck = dst / "checkpoints"
        for d in ck.glob("step_*"):
            if int(d.name.split("_")[1]) > step:
                shutil.rmtree(d)
        (ck / "latest").write_text(f"step_{step:08d}")
    dist.barrier()


def main():
    report_path, jobs_json = sys.argv[1:]
    jobs = json.loads(Path(jobs_json).read_text())
    info = init_distributed()
    ensure_process_group(info)  # a 1-rank launch has none: the barriers between jobs need one
    report = {"world": info.world_size}
    for job in jobs:
        t0 = time.time()
        cfg = load_config(None, job["overrides"])
        rec = {}
        if job.get("reload"):
            src = Path(job["reload"])
            method, eng = build_parts(cfg, info)
            ckpt = find_latest(src)
            state = eng.load(str(ckpt))
            now = full_state(eng)
            if info.is_main:
                rec["reload"] = compare_states(torch.load(src / "ref.pt", weights_only=False), now)
                rec["reload"]["train_state"] = state
                shutil.copytree(src, cfg.output_dir)
            dist.barrier()
            del eng, method
        if job.get("resume_from"):
            resume_copy(Path(job["resume_from"]["run"]), Path(cfg.output_dir), int(job["resume_from"]["step"]), info)
        out_dir, built, snaps = Path(cfg.output_dir), {}, {}
        calls = {"n": 0}
        nan_at, inf_at = job.get("nan_at"), job.get("inf_grad_at")
        snap_calls = set(job.get("snap_calls", ()))
        nan_inputs = set(job.get("nan_input_at", ()))

        def build(*a, **k):  # injected as the Trainer's engine_factory
            built["engine"] = build_engine(*a, **k)
            instrument(built["engine"], job, info, out_dir)
            return built["engine"]

        class Instrumented(SEREMethod):  # injected as the Trainer's method_cls
            def forward(self, *a, **k):
                calls["n"] += 1
                if calls["n"] in snap_calls:
                    snaps[calls["n"]] = full_state(built["engine"])
                if calls["n"] in nan_inputs and job.get("nan_rank", info.rank) == info.rank:
                    batch = a[2]
                    a = (*a[:2], {**batch, "crops": [c * float("nan") for c in batch["crops"]]}, *a[3:])
                out = super().forward(*a, **k)
                if calls["n"] == nan_at:  # the loss of the nan_at-th forward call (counted from 1) becomes NaN
                    out["loss"] = out["loss"] * float("nan")
                if calls["n"] == inf_at and info.rank == 0:
                    out["loss"] = InfGrad.apply(out["loss"])
                return out
        try:
            out = train(cfg, resume=job.get("resume", False) or bool(job.get("reload") or job.get("resume_from")),
                        info=info, method_cls=Instrumented, engine_factory=build)
        except Exception as e:  # noqa: BLE001 - expected by jobs with "raises": reported, the next job runs
            if not job.get("raises") or job["raises"] not in f"{type(e).__name__}: {e}":
                raise
            report[job["name"]] = {"raised": f"{type(e).__name__}: {e}"}
            dist.barrier()
            continue
        if snaps and info.is_main:
            torch.save(snaps, out_dir / "snaps.pt")
        eng = out["engine"]
        rec["step"] = out["step"]
        rec["exit"] = out["exit"]
        if job.get("ref"):
            st = full_state(eng)
            if info.is_main:
                torch.save(st, Path(cfg.output_dir) / "ref.pt")
        if job.get("ema"):
            rec["ema"] = ema_check(eng, float(job["ema"]))
        dist.barrier()
        rec["seconds"] = round(time.time() - t0, 1)
        report[job["name"]] = rec
    if info.is_main:
        Path(report_path).write_text(json.dumps(report, indent=1, default=str))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
