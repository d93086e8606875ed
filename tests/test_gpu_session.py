"""benchmarks/gpu_session.py, the driver of the one-call GPU session: a step that fails, hangs (its whole process
group is killed at its limit) or no longer fits the budget is recorded and the run goes on; the summary is built
from partial and failed results."""
import importlib.util
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _driver():
    spec = importlib.util.spec_from_file_location("gpu_session", ROOT / "benchmarks" / "gpu_session.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve the module's annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state  # a zombie waiting for its reaper is dead


def test_failing_hanging_and_unaffordable_steps(tmp_path):
    gs = _driver()
    py = sys.executable
    hang = ("import subprocess, sys, time; c = subprocess.Popen(['sleep', '60']); print('child', c.pid, flush=True); "
            "time.sleep(60)")
    steps = [gs.Step("fails", [py, "-c", "import sys; print('boom'); sys.exit(3)"], 20, 1),
             gs.Step("hangs", [py, "-c", hang], 1.5, 0.5),
             gs.Step("ok", lambda res: [py, "-c", f"print({len(res['steps'])})"], 20, 1),
             gs.Step("too_big", [py, "-c", "print('never')"], 20, 10 ** 6),
             gs.Step("needs_ds", [py, "-c", "print('never')"], 20, 1, needs="deepspeed")]
    res = {"meta": {}, "steps": {}, "have": {"deepspeed": False}}
    log = tmp_path / "session.log"
    t0 = time.time()
    for s in steps:
        res["steps"][s.name] = gs.run_step(s, res, time.time() + 60, log, None)
    st = res["steps"]
    assert time.time() - t0 < 30
    assert (st["fails"]["status"], st["fails"]["rc"]) == ("failed", 3) and st["fails"]["tail"][0] == "boom"
    assert st["hangs"]["status"] == "timeout" and st["hangs"]["wall_s"] < 10
    child = int(next(ln for ln in st["hangs"]["tail"] if ln.startswith("child")).split()[1])
    deadline = time.time() + 5
    while _alive(child) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the step's child process outlived its limit"
    assert st["ok"]["status"] == "ok" and st["ok"]["tail"][0] == "2"  # argv built from the results so far
    assert st["too_big"]["status"] == "skipped" and "budget" in st["too_big"]["note"]
    assert st["needs_ds"]["status"] == "skipped" and "deepspeed" in st["needs_ds"]["note"]
    assert "boom" in log.read_text()
    md = gs.build_summary(res)
    assert "| fails | failed |" in md and "### hangs (timeout" in md and "| too_big | skipped |" in md


def test_summary_from_fake_results():
    gs = _driver()
    res = {"meta": {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "finished": True, "elapsed_s": 480.0},
           "steps": {
               "pytest": {"status": "ok", "wall_s": 50.0, "parsed": {
                   "tests": 30, "failures": 1, "errors": 0, "skipped": 0, "passed": 29,
                   "cuda_cases": {"a::test_x[cuda-bf16]": "failed", "a::test_y[cuda-fp16]": "passed"},
                   "failed": [{"test": "a::test_x[cuda-bf16]", "message": "mismatch"}]}},
               "relation_ce_fp32": {"status": "ok", "wall_s": 40.0, "parsed": {
                   "header": "device: H100, dtype: fp32", "table": "| size | impl |\n|---|---|\n| m16 | triton |"}},
               "profile_b16": {"status": "ok", "wall_s": 80.0, "parsed": {
                   "img_per_s_per_device": 700.0, "step_time_s": 0.0914, "mfu": 0.41, "peak_flops": 989e12,
                   "peak_flops_source": "table:H100", "flops_per_image": 4.6e11, "peak_memory_bytes": 40 * 2**30,
                   "baseline_img_per_s": 900.0, "speed_vs_baseline": 0.78, "timed_step_time_s": 0.1,
                   "step_breakdown_s": {"backward": 0.05, "optimizer": 0.01}}},
               "engine_ddp_bf16": {"status": "ok", "wall_s": 30.0, "parsed": {"rows": [
                   {"backend": "ddp", "precision": "bf16", "ms_median": 95.0, "img_per_s": 673.7, "peak_gib": 30.1}]}},
               "engine_zero3_bf16": {"status": "failed", "rc": 1, "wall_s": 20.0, "tail": ["RuntimeError: bad"],
                                     "parsed": {"rows": [{"backend": "zero3", "error": "RuntimeError: bad"}]}},
               "engine_zero1_bf16": {"status": "skipped", "note": "deepspeed not importable"},
               "decode_hazard": {"status": "ok", "wall_s": 8.0, "parsed": {
                   "gpu": "H100", "torchvision": "0.26", "results": {
                       "torchvision_decode_jpeg/baseline": {"corrupted_iterations": 30, "iterations": 40,
                                                            "decode_call_ms_mean": 1.2}}}},
               "gpu_multicrop": {"status": "timeout", "wall_s": 100.0, "tail": ["still decoding"]},
           }}
    md = gs.build_summary(res)
    for piece in ("# GPU session: NVIDIA H100 80GB HBM3", "29 passed, 1 failed", "CUDA cases failed: 1",
                  "| m16 | triton |", "**700.0 images/s**", "| MFU | 41.0 % of 989 TFLOP/s", "0.78×",
                  "| ddp_bf16 | bf16 | 95.0 | 673.7 | 30.10 |", "| zero3_bf16 | failed: RuntimeError: bad",
                  "| zero1_bf16 | skipped: deepspeed not importable", "| torchvision_decode_jpeg/baseline | 30 / 40 |",
                  "### gpu_multicrop (timeout", "still decoding"):
        assert piece in md, piece


def test_cuda_plan_outputs_are_distinct_and_multicrop_gets_the_step_rate(tmp_path):
    gs = _driver()
    res = {"steps": {"profile_b16": {"parsed": {"img_per_s_per_device": 700.0}}}}
    steps = gs.plan("cuda", "python3", tmp_path)
    argvs = {s.name: (s.argv(res) if callable(s.argv) else s.argv) for s in steps}
    outs = [a[a.index(flag) + 1] for a in argvs.values() for flag in ("--out", "--json") if flag in a]
    assert len(outs) == len(set(outs)) == len([s for s in steps if s.name.startswith(("engine", "relation",
                                                                                      "decode", "gpu_multi",
                                                                                      "plan"))])
    mc = argvs["gpu_multicrop"]
    assert mc[mc.index("--train-rate") + 1] == "700.0" and mc[mc.index("--out") + 1].endswith("gpu_multicrop.json")
    assert [s.name for s in steps][:4] == ["pytest", "relation_ce_fp32", "relation_ce_bf16", "profile_b16"]


def test_plan_memory_step_dry_run_on_the_cpu(tmp_path):
    """The GPU session's ``plan_memory`` step (benchmarks/plan_gpu_check.py) as its CPU dry run plans it, on one
    backend: the plan's trace and real steps run, the row and its summary table come out; the comparison's
    15 % rule by hand."""
    import json
    import subprocess

    from tests.conftest import subprocess_env
    gs = _driver()
    step = next(s for s in gs.plan("cpu", sys.executable, tmp_path) if s.name == "plan_memory")
    argv = list(step.argv)
    argv[argv.index("--backends") + 1] = "ddp"
    out = subprocess.run(argv, cwd=ROOT, env=subprocess_env(DS_ACCELERATOR="cpu"), capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = gs.parse_file_json("json")({}, step)
    assert [(r["backend"], r["device"], r["max_memory_allocated"]) for r in rows] == [("ddp", "cpu", None)]
    assert rows[0]["predicted_peak_bytes"] > rows[0]["batch_bytes"] > 0
    md = gs.build_summary({"meta": {}, "steps": {"plan_memory": {"status": "ok", "parsed": rows}}})
    assert "## Plan: predicted peak per GPU" in md and "| configs/demo_ibot.yaml | ddp | 4 |" in md
    spec = importlib.util.spec_from_file_location("plan_gpu_check", ROOT / "benchmarks" / "plan_gpu_check.py")
    pgc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pgc)
    assert pgc.compare("c", "ddp", 8, 115, 100, 1, "gpu")["within_15_percent"] is True
    assert pgc.compare("c", "ddp", 8, 84, 100, 1, "gpu")["within_15_percent"] is False
    assert json.dumps(pgc.compare("c", "ddp", 8, 50, 100, 1, "gpu")["ratio"]) == "0.5"
