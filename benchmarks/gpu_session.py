"""Every pending GPU check of docs/PERFORMANCE.md in one run that fits one device call.

    bash benchmarks/gpu_session.sh                      # on the GPU machine (prints the environment, installs
                                                        # .whl/ wheels, then runs this driver)
    python benchmarks/gpu_session.py --device cuda --out DIR [--budget 500] [--only a,b] [--skip c] [--list]
    DEVICE=cpu bash benchmarks/gpu_session.sh           # dry run of the plumbing on a CPU (tiny sizes)

Steps run in order of value (kernel parity and relation CE, then the profile against the bare backbones, then
one training step per engine, then the data path), each in its own process group under its own time limit,
capped by what is left of the whole budget; a step that fails or runs out of time is recorded and the next one
starts; a step whose minimum time is no longer left is skipped. After every step ``results.json`` (everything,
including each step's last lines of output) and ``summary.md`` (tables to paste into docs/PERFORMANCE.md) are
rewritten in ``--out``, next to ``session.log`` (every step's full output), so a run cut short still leaves its
results. At most four files are written there (the device call returns at most eight).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RESERVE_S = 8.0  # kept back at the end of the budget for the last summary
TAIL_LINES = 40
B16 = "configs/ibot_sere_vit_b16.yaml"
L16 = "configs/ibot_sere_vit_l16_fsdp.yaml"


@dataclass
class Step:
    name: str
    argv: Callable[[dict], list] | list  # list, or a function of the results so far
    budget_s: float  # time limit of this step
    min_s: float  # skipped if less than this is left
    parse: Callable[[dict, "Step"], dict] | None = None
    needs: str = ""  # "deepspeed": skipped when deepspeed does not import
    title: str = ""
    files: dict = field(default_factory=dict)  # named output files the parser reads


# ---------------------------------------------------------------------------------------------- parsers
def _json(path) -> dict:
    return json.loads(Path(path).read_text())


def parse_pytest(res: dict, step: Step) -> dict:
    root = ET.parse(step.files["junit"]).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": [], "cuda_cases": {}}
    for s in suites:
        for k in ("tests", "failures", "errors", "skipped"):
            out[k] += int(s.get(k, 0))
        for case in s.iter("testcase"):
            name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
            bad = case.find("failure")
            if bad is None:
                bad = case.find("error")
            skip = case.find("skipped")
            state = "failed" if bad is not None else "skipped" if skip is not None else "passed"
            if bad is not None:
                out["failed"].append({"test": name, "message": (bad.get("message") or "")[:300]})
            if "cuda" in name.lower():
                out["cuda_cases"][name] = state
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    return out


def parse_file_json(key: str):
    def parse(res: dict, step: Step) -> dict:
        return _json(step.files[key])
    return parse


def parse_profile(res: dict, step: Step) -> dict:
    d = Path(step.files["dir"])
    out = _json(d / "profile.json")
    if (d / "profile.md").exists():
        out["profile_md"] = (d / "profile.md").read_text()
    return out


def parse_tables(res: dict, step: Step) -> dict:
    """A benchmark that prints markdown tables: keep its table lines."""
    return {"tables": [ln for ln in step_output(res, step.name).splitlines() if ln.startswith("|")]}


def parse_deepspeed(res: dict, step: Step) -> dict:
    lines = [ln for ln in step_output(res, step.name).splitlines() if ln.startswith("deepspeed ")]
    return {"version": lines[-1].split()[1] if lines else None}


def step_output(res: dict, name: str) -> str:
    return "\n".join(res["steps"].get(name, {}).get("tail", []))


# ---------------------------------------------------------------------------------------------- the plan
def plan(device: str, py: str, work: Path) -> list:
    """The steps, in order; ``device='cpu'`` gives the same steps at tiny sizes (a dry run of the plumbing)."""
    cuda = device == "cuda"
    steps = []

    def add(name, argv, budget, min_s, parse=None, needs="", title="", **files):
        steps.append(Step(name, argv, budget, min_s, parse, needs, title, files))

    junit = work / "pytest.xml"
    tests = (["tests/test_kernels_triton.py", "tests/test_gpu_multicrop.py", "tests/test_gpu_decode.py"] if cuda
             else ["tests/test_kernels_triton.py", "tests/test_gpu_decode.py", "-k", "unsupported or waits"])
    add("pytest", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *tests],
        150, 30, parse_pytest, title="Triton kernel parity, nvJPEG + CUDA multi-crop tests", junit=junit)

    for dt, budget in (("fp32", 130), ("bf16", 100)):
        j = work / f"relation_ce_{dt}.json"
        sizes = [] if cuda else ["--sizes", "8x64x16,4x40x12", "--threads", "1"]
        add(f"relation_ce_{dt}", [py, "benchmarks/relation_ce.py", "--device", device, "--dtype", dt, "--repeats",
                                  "3" if cuda else "1", "--warmup", "1" if cuda else "0", *sizes, "--json", str(j)],
            budget, 30, parse_file_json("json"), title=f"Relation cross-entropy, {dt}", json=j)

    prof = work / "profile_b16"
    model = ["-c", B16, "--steps", "15", "--warmup", "3", "data.batch_size=64"] if cuda else \
        ["-c", "configs/demo_ibot.yaml", "--steps", "2", "--warmup", "1", "data.batch_size=8", "image_loss.out_dim=256"]
    add("profile_b16", [py, "-m", "sere_scale", "profile", "--synthetic", "--baseline", *model,
                        f"output_dir={prof}"],
        150, 45, parse_profile, title="Profiler: iBOT+SERE step vs bare backbones", dir=prof)

    add("deepspeed_import", [py, "-c", "import deepspeed; print('deepspeed', deepspeed.__version__)"], 60, 10,
        parse_deepspeed, title="DeepSpeed import")

    engine_cfg = ["--config", B16, "--steps", "6", "--warmup", "2"] if cuda else ["--tiny", "--steps", "2",
                                                                                   "--warmup", "1"]
    engine_over = ["data.batch_size=64"] if cuda else []
    runs = [("ddp", "bf16", False), ("fsdp", "bf16", False), ("zero1", "bf16", False), ("zero2", "bf16", False),
            ("zero3", "bf16", False)]
    if cuda:
        runs += [("ddp", "fp16", False)]
    for backend, prec, _ in runs:
        j = work / f"engine_{backend}_{prec}.json"
        precision = [f"train.precision={prec}"] if cuda else []
        add(f"engine_{backend}_{prec}" if cuda else f"engine_{backend}",
            [py, "benchmarks/engine_step.py", "--device", device, "--nproc", "1", *engine_cfg, "--backends", backend,
             "--out", str(j), *engine_over, *precision],
            90, 30, parse_file_json("json"), needs="deepspeed" if backend.startswith("zero") else "",
            title=f"Engine step {backend} {prec}", json=j)

    j = work / "plan_memory.json"
    pm = (["--configs", f"{B16},{L16}", "--backends", "ddp,fsdp:full", "--batch", "32", "--steps", "2", "--timeout",
           "100"] if cuda else ["--configs", "configs/demo_ibot.yaml", "--backends", "ddp,fsdp:full", "--batch", "4",
                                "--steps", "1", "--device", "cpu", "image_loss.out_dim=256"])
    add("plan_memory", [py, "benchmarks/plan_gpu_check.py", *pm, "--json", str(j)], 150, 60,
        parse_file_json("json"), title="Plan: predicted peak vs torch.cuda.max_memory_allocated", json=j)

    j = work / "decode_hazard.json"
    add("decode_hazard", [py, "benchmarks/decode_hazard.py", "--iters", "40" if cuda else "2", "--out", str(j)],
        45, 10, parse_file_json("json"), title="nvJPEG write-while-in-use check", json=j)

    def multicrop_argv(res, j=work / "gpu_multicrop.json"):
        rate = (res["steps"].get("profile_b16", {}).get("parsed") or {}).get("img_per_s_per_device")
        sizes = (["--batch", "256", "--iters", "10", "--warmup", "2", "--images", "512", "--cpu-images", "32"] if cuda
                 else ["--batch", "4", "--iters", "1", "--warmup", "1", "--images", "8", "--cpu-images", "4",
                       "--global-size", "64", "--local-size", "32", "--n-local", "2"])
        return [py, "benchmarks/gpu_multicrop.py", "--device", device, *sizes, "--out", str(j),
                *(["--train-rate", f"{rate:.1f}"] if rate else [])]
    add("gpu_multicrop", multicrop_argv, 100, 30, parse_file_json("json"), title="GPU multi-crop throughput",
        json=work / "gpu_multicrop.json")

    dense = (["--arch", "vit_base_patch16_224", "--size", "512", "--batch", "8", "--n-train", "32", "--n-val", "16",
              "--iters", "200", "--memory", "102400", "--banks", "10000,100000,1000000", "--dim", "768",
              "--classes", "21"] if cuda else ["--size", "64", "--n-train", "2", "--n-val", "1", "--iters", "2",
                                               "--memory", "64", "--banks", "1000", "--repeats", "1"])
    add("dense_eval", [py, "benchmarks/dense_eval.py", "--device", device, *dense], 90, 30, parse_tables,
        title="Dense evaluation: patch features, probes, nn retrieval memory (docs/EVAL.md)")

    if cuda:
        j = work / "engine_ddp_bf16_compile.json"
        add("engine_ddp_bf16_compile",
            [py, "benchmarks/engine_step.py", "--device", device, "--nproc", "1", *engine_cfg, "--backends", "ddp",
             "--out", str(j), *engine_over, "train.precision=bf16", "engine.compile=true"],
            240, 90, parse_file_json("json"), title="Engine step ddp bf16, engine.compile=true", json=j)
    return steps


def selftest_steps(py: str) -> list:
    """Steps that must fail, time out and be skipped (the dry run proves the driver survives them)."""
    return [Step("selftest_fail", [py, "-c", "import sys; print('failing on purpose'); sys.exit(3)"], 20, 1),
            Step("selftest_timeout", [py, "-c", "import time; print('sleeping', flush=True); time.sleep(600)"], 4, 1),
            Step("selftest_no_budget", [py, "-c", "print('never runs')"], 10, 10 ** 6)]


# ---------------------------------------------------------------------------------------------- running
def _kill_group(p: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_step(step: Step, res: dict, deadline: float, log_path: Path, env: dict) -> dict:
    left = deadline - time.time() - RESERVE_S
    rec = {"title": step.title, "budget_s": step.budget_s, "min_s": step.min_s}
    if step.needs and res.get("have", {}).get(step.needs) is False:  # unknown (its check not run): try
        return {**rec, "status": "skipped", "note": f"{step.needs} not importable"}
    if left < step.min_s:
        return {**rec, "status": "skipped", "note": f"budget: {max(left, 0):.0f} s left < {step.min_s:.0f} s"}
    limit = min(step.budget_s, left)
    argv = step.argv(res) if callable(step.argv) else step.argv
    rec.update(cmd=" ".join(str(a) for a in argv), limit_s=round(limit, 1))
    with open(log_path, "ab") as log:
        log.write(f"\n===== {step.name} (limit {limit:.0f} s): {rec['cmd']}\n".encode())
        log.flush()
        start_off = log.tell()
        t0 = time.time()
        try:
            p = subprocess.Popen([str(a) for a in argv], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            return {**rec, "status": "failed", "rc": None, "wall_s": 0.0, "note": f"could not start: {e}"}
        try:
            rc = p.wait(timeout=limit)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(p)
            rc, status = None, "timeout"
        wall = time.time() - t0
        log.write(f"===== {step.name}: {status} (rc {rc}) after {wall:.1f} s\n".encode())
    with open(log_path, "rb") as f:
        f.seek(start_off)
        text = f.read().decode(errors="replace")
    tail = [ln[:400] for ln in text.splitlines()[-TAIL_LINES:]]
    rec.update(status=status, rc=rc, wall_s=round(wall, 1), tail=tail)
    return rec


def parse_step(step: Step, res: dict) -> None:
    rec = res["steps"][step.name]
    if step.parse is None or rec["status"] == "skipped":
        return
    try:
        rec["parsed"] = step.parse(res, step)
    except Exception as e:  # noqa: BLE001 -- a missing or partial output file: keep the run going
        rec["parse_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    if step.name == "deepspeed_import":
        res.setdefault("have", {})["deepspeed"] = rec["status"] == "ok"


# ---------------------------------------------------------------------------------------------- summary
def _f(v, spec=".1f", unit=""):
    return "–" if v is None else f"{format(v, spec)}{unit}"


def _section_pytest(p: dict) -> list:
    lines = [f"{p['passed']} passed, {p['failures'] + p['errors']} failed, {p['skipped']} skipped "
             f"(of {p['tests']})", ""]
    if p.get("cuda_cases"):
        states = {}
        for n, s in p["cuda_cases"].items():
            states.setdefault(s, []).append(n)
        lines += [f"* CUDA cases {s}: {len(v)}" + (f" ({', '.join(sorted(v))})" if s != "passed" else "")
                  for s, v in sorted(states.items())]
    lines += [f"* FAILED `{f['test']}`: {f['message']}" for f in p.get("failed", [])]
    return lines


def _section_profile(p: dict) -> list:
    bd = p.get("step_breakdown_s", {})
    step = max(p.get("timed_step_time_s") or 0, 1e-12)
    lines = ["| figure | value |", "|---|---|",
             f"| device, precision, backend | {p.get('device')}, {p.get('precision')}, {p.get('backend')} |",
             f"| model, crops, batch per device | {p.get('arch')}, {p.get('crops')}, "
             f"{p.get('batch_size_per_device')} |",
             f"| full step | **{_f(p.get('img_per_s_per_device'))} images/s**, "
             f"{_f((p.get('step_time_s') or 0) * 1e3)} ms |",
             f"| MFU | {_f((p.get('mfu') or 0) * 100)} % of {_f((p.get('peak_flops') or 0) / 1e12, '.3g')} TFLOP/s "
             f"({p.get('peak_flops_source')}) |",
             f"| FLOPs per image | {_f((p.get('flops_per_image') or 0) / 1e9, '.1f')} GFLOP |",
             f"| peak memory | {_f((p.get('peak_memory_bytes') or 0) / 2**30, '.2f')} GiB |"]
    if p.get("baseline_img_per_s") is not None:
        lines.append(f"| bare backbones (baseline) | {_f(p['baseline_img_per_s'])} images/s; full step at "
                     f"{_f(p.get('speed_vs_baseline'), '.2f')}× of it |")
    if bd:
        lines += ["", "| part | ms | share |", "|---|---:|---:|"]
        lines += [f"| {k} | {v * 1e3:.2f} | {v / step * 100:.1f} % |" for k, v in bd.items()]
    return lines


def _section_engines(res: dict) -> list:
    rows = []
    for name, rec in res["steps"].items():
        if not name.startswith("engine_"):
            continue
        label = name[len("engine_"):]
        if rec["status"] == "skipped":
            rows.append(f"| {label} | skipped: {rec.get('note', '')} | | | |")
            continue
        parsed = rec.get("parsed") or {}
        got = parsed.get("rows") or []
        if not got:
            rows.append(f"| {label} | {rec['status']}: {_last_error(rec)} | | | |")
        for r in got:
            if "error" in r:
                rows.append(f"| {label} | failed: {r['error'][:160]} | | | |")
            else:
                rows.append(f"| {label} | {r['precision']} | {r['ms_median']:.1f} | {r['img_per_s']:.1f} | "
                            f"{r['peak_gib']:.2f} |")
    if not rows:
        return []
    return ["| run | precision | ms/step (median) | images/s | peak GiB |", "|---|---|---:|---:|---:|", *rows]


def _section_multicrop(p: dict) -> list:
    d = p.get("device_side", {})
    c = p.get("cpu_multicrop_one_core", {})
    lines = [f"`{p.get('command', '')}` on {d.get('gpu', p.get('device'))}, recipe {p.get('recipe')}, batch "
             f"{p.get('batch')}, mean JPEG {_f(p.get('mean_jpeg_kib'))} KiB", "",
             "| what | images/s |", "|---|---:|",
             f"| GPUMultiCrop, decode + full recipe | **{_f(d.get('images_per_s'))}** |",
             f"| decode only | {_f(d.get('decode_only_images_per_s'))} |",
             f"| CPU MultiCrop, one core (per CPU-second) | {_f(c.get('images_per_cpu_s'))} |"]
    if "device_vs_one_core" in p:
        lines.append(f"| device / one core | {_f(p['device_vs_one_core'])}× |")
    if "max_memory_gib" in d:
        lines.append(f"| peak memory | {_f(d['max_memory_gib'], '.2f')} GiB |")
    if "data_wait" in p:
        w = p["data_wait"]
        lines.append(f"| data wait at the profiled step rate | {_f(w['cpu_cores_to_feed_train_rate'])} CPU cores to "
                     f"feed it; device augment {_f(w['device_augment_share_of_step'] * 100)} % of a step, "
                     f"{_f(w['throughput_with_device_augment'])} images/s end to end |")
    return lines


def _section_plan_memory(rows: list) -> list:
    lines = ["| config | backend | batch | predicted GiB | max_memory_allocated GiB | ratio | within 15 % |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['backend']} | – | – | – | – | error: "
                         f"{r['error'].strip().splitlines()[-1][:120] if r['error'].strip() else '?'} |")
            continue
        real = r.get("max_memory_allocated")
        lines.append(f"| {r['config']} | {r['backend']} | {r['batch']} | {r['predicted_peak_bytes'] / 2**30:.2f} | "
                     f"{_f(real and real / 2**30, '.2f')} | {_f(r.get('ratio'), '.3f')} | "
                     f"{r.get('within_15_percent')} |")
    return lines


def _section_hazard(p: dict) -> list:
    if "skipped" in p:
        return [f"skipped: {p['skipped']}"]
    lines = [f"{p.get('gpu')}, torchvision {p.get('torchvision')}", "",
             "| decoder / JPEG | corrupted iterations | decode call ms |", "|---|---:|---:|"]
    for k, v in p.get("results", {}).items():
        lines.append(f"| {k} | {v['corrupted_iterations']} / {v['iterations']} | {v['decode_call_ms_mean']:.2f} |")
    return lines


def _last_error(rec: dict) -> str:
    tail = [ln for ln in rec.get("tail") or [] if not ln.startswith("=====")]
    for ln in reversed(tail):
        if "Error" in ln or "error" in ln:
            return ln.strip()[:200]
    return (tail[-1].strip()[:200] if tail else "")


def build_summary(res: dict) -> str:
    """Markdown summary of a (possibly partial) results dict."""
    m = res.get("meta", {})
    lines = [f"# GPU session: {m.get('gpu', '?')}", "",
             f"* date (UTC): {m.get('started_utc', '?')}; commit {m.get('commit', '?')}; device {m.get('device')}",
             f"* torch {m.get('torch')}, CUDA {m.get('cuda')}, triton {m.get('triton')}, torchvision "
             f"{m.get('torchvision')}, timm {m.get('timm')}, python {m.get('python')}",
             f"* budget {m.get('budget_s')} s; used {_f(m.get('elapsed_s'))} s"
             + (" (still running)" if not m.get("finished") else ""), "",
             "| step | status | wall s | limit s | note |", "|---|---|---:|---:|---|"]
    for name, rec in res["steps"].items():
        note = rec.get("note") or rec.get("parse_error") or (_last_error(rec) if rec["status"] != "ok" else "")
        lines.append(f"| {name} | {rec['status']} | {_f(rec.get('wall_s'))} | {_f(rec.get('limit_s'), '.0f')} | "
                     f"{note.replace('|', '/')} |")
    sections = [
        ("pytest", "Kernel and CUDA tests", _section_pytest),
        ("relation_ce_fp32", "Relation cross-entropy, fp32",
         lambda p: [f"`{p.get('header', '')}`", "", p.get("table", "")]),
        ("relation_ce_bf16", "Relation cross-entropy, bf16",
         lambda p: [f"`{p.get('header', '')}`", "", p.get("table", "")]),
        ("profile_b16", "Profiler: full step vs bare backbones", _section_profile),
        ("decode_hazard", "nvJPEG writes into memory still in use? (pytorch/vision#9606)", _section_hazard),
        ("gpu_multicrop", "GPU multi-crop", _section_multicrop),
        ("plan_memory", "Plan: predicted peak per GPU vs torch.cuda.max_memory_allocated", _section_plan_memory),
    ]
    for name, title, fn in sections:
        parsed = res["steps"].get(name, {}).get("parsed")
        if parsed:
            lines += ["", f"## {title}", ""]
            try:
                lines += fn(parsed)
            except Exception as e:  # noqa: BLE001
                lines.append(f"(could not format: {type(e).__name__}: {e})")
        if name == "profile_b16":
            eng = _section_engines(res)
            if eng:
                lines += ["", "## Engines: one training step (1 GPU, synthetic batches)", "", *eng]
    bad = [(n, r) for n, r in res["steps"].items() if r["status"] in ("failed", "timeout")]
    if bad:
        lines += ["", "## Failures (last lines of output; all of it in session.log)"]
        for n, r in bad:
            lines += ["", f"### {n} ({r['status']}, rc {r.get('rc')})", "", "```", *(r.get("tail") or [])[-15:], "```"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main
def environment(device: str) -> dict:
    env = {"python": platform.python_version(), "host": platform.node(), "device": device,
           "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        env["commit"] = None
    env["commit"] = os.environ.get("COMMIT") or env["commit"] or "unknown"
    code = ("import json, torch\nout = {'torch': torch.__version__, 'cuda': torch.version.cuda}\n"
            "for m in ('triton', 'torchvision', 'timm'):\n"
            "    try: out[m] = __import__(m).__version__\n"
            "    except Exception as e: out[m] = 'missing: ' + type(e).__name__\n"
            "out['gpu'] = torch.cuda.get_device_name() if torch.cuda.is_available() else 'none (CPU)'\n"
            "print(json.dumps(out))")
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
        env.update(json.loads(p.stdout.strip().splitlines()[-1]))
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as e:
        env["env_error"] = f"{type(e).__name__}: {e}"
    return env


def select(steps: list, only: str, skip: str) -> list:
    def match(name, pats):
        return any(name == p or name.startswith(p) for p in pats)
    only_p = [p for p in only.split(",") if p]
    skip_p = [p for p in skip.split(",") if p]
    return [s for s in steps if (not only_p or match(s.name, only_p)) and not match(s.name, skip_p)]


def write_outputs(res: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "summary.md").write_text(build_summary(res))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu_session"))
    ap.add_argument("--work", default=None, help="scratch folder for the steps' own outputs (default: a temporary "
                    "folder, removed at the end)")
    ap.add_argument("--budget", type=float, default=500.0, help="seconds for all steps together")
    ap.add_argument("--deadline", type=float, default=None, help="absolute end (epoch seconds); overrides --budget")
    ap.add_argument("--only", default="", help="comma list of step names or prefixes to run")
    ap.add_argument("--skip", default="", help="comma list of step names or prefixes to leave out")
    ap.add_argument("--selftest", action="store_true", help="add steps that fail, time out and are skipped")
    ap.add_argument("--list", action="store_true", help="print the plan and exit")
    args = ap.parse_args(argv)
    t_start = time.time()
    deadline = args.deadline or t_start + args.budget
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or os.path.join(os.environ.get("TMPDIR", "/tmp"), f"gpu_session_{os.getpid()}"))
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    steps = plan(args.device, py, work)
    if args.selftest:
        steps[1:1] = selftest_steps(py)
    steps = select(steps, args.only, args.skip)
    if args.list:
        for s in steps:
            argv_ = s.argv({"steps": {}}) if callable(s.argv) else s.argv
            print(f"{s.name:28s} limit {s.budget_s:4.0f} s, min {s.min_s:3.0f} s: {' '.join(map(str, argv_))}")
        return 0

    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    if args.device == "cuda" and env.get("DS_ACCELERATOR") == "cpu":
        env.pop("DS_ACCELERATOR")
    if args.device == "cpu":
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
    res = {"meta": {**environment(args.device), "budget_s": round(deadline - t_start), "finished": False},
           "steps": {}, "have": {}}
    log_path = out / "session.log"
    print(f"gpu_session: {len(steps)} steps, {deadline - time.time():.0f} s budget, device {args.device}, "
          f"{res['meta'].get('gpu')}; output in {out}", flush=True)
    for step in steps:
        rec = run_step(step, res, deadline, log_path, env)
        res["steps"][step.name] = rec
        parse_step(step, res)
        res["meta"]["elapsed_s"] = round(time.time() - t_start, 1)
        write_outputs(res, out)
        print(f"[{res['meta']['elapsed_s']:6.1f} s] {step.name}: {rec['status']}"
              + (f" in {rec['wall_s']} s" if "wall_s" in rec else "")
              + (f" ({rec['note']})" if rec.get("note") else "")
              + (f" [parse: {rec['parse_error']}]" if rec.get("parse_error") else ""), flush=True)
    res["meta"].update(finished=True, elapsed_s=round(time.time() - t_start, 1))
    write_outputs(res, out)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + (out / "summary.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
