"""Profile outputs: profile.json, profile.md and PNG plots; sweep tables and plots."""
from __future__ import annotations

import json
from pathlib import Path


def _fmt_bytes(n) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_profile(res: dict, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(res, indent=2))
    bd = res["step_breakdown_s"]
    lines = [f"# Profile: {res['arch']} ({res['crops']}), {res['backend']} × {res['world_size']}, "
             f"{res['precision']} on {res['device']}", "",
             "| figure | value |", "|---|---|",
             f"| images/s (total) | {res['img_per_s']:.1f} |",
             f"| images/s per device | {res['img_per_s_per_device']:.1f} |",
             f"| step time | {res['step_time_s'] * 1e3:.1f} ms |",
             f"| MFU | {res['mfu'] * 100:.1f}% (peak {res['peak_flops'] / 1e12:.3g} TFLOP/s, "
             f"{res['peak_flops_source']}) |",
             f"| FLOPs per image | {res['flops_per_image'] / 1e9:.2f} GFLOP |",
             f"| peak memory | {_fmt_bytes(res['peak_memory_bytes'])} |",
             f"| data wait | {res['data_wait_frac'] * 100:.1f}% of the step |"]
    if res.get("loader_img_per_s") is not None:
        lines += [f"| loader alone | {res['loader_img_per_s']:.1f} images/s |",
                  f"| model alone (synthetic data) | {res['model_img_per_s']:.1f} images/s |",
                  f"| bottleneck | {res['bottleneck']} |"]
    if res.get("baseline_img_per_s") is not None:
        lines += [f"| bare-backbone baseline | {res['baseline_img_per_s']:.1f} images/s per device "
                  f"(full step at {res['speed_vs_baseline']:.2f}× of it) |"]
    lines += ["", "## Step breakdown (synchronised region timers)", "", "| part | ms | share |", "|---|---|---|"]
    total = max(res["timed_step_time_s"], 1e-12)
    for k, v in bd.items():
        lines.append(f"| {k} | {v * 1e3:.2f} | {v / total * 100:.1f}% |")
    lines.append(f"| (step) | {total * 1e3:.2f} | 100% |")
    (out / "profile.md").write_text("\n".join(lines) + "\n")

    plt = _plt()
    files = []
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(bd)
    ax.barh(names, [bd[n] * 1e3 for n in names], color="#4c72b0")
    ax.invert_yaxis()
    ax.set_xlabel("ms per step")
    ax.set_title("Step breakdown")
    fig.tight_layout()
    files.append(out / "breakdown.png")
    fig.savefig(files[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.2))
    bars = {"train step": res["img_per_s_per_device"]}
    if res.get("loader_img_per_s") is not None:
        bars.update({"loader alone": res["loader_img_per_s"], "model alone": res["model_img_per_s"]})
    ax.bar(list(bars), list(bars.values()), color=["#4c72b0", "#dd8452", "#55a868"][:len(bars)])
    ax.set_ylabel("images/s per device")
    ax.set_title("Throughput")
    fig.tight_layout()
    files.append(out / "throughput.png")
    fig.savefig(files[-1], dpi=100)
    plt.close(fig)
    return files


def write_sweep(rows: list[dict], out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(rows, indent=2))
    keys = sorted({k for r in rows for k in r["overrides"]})
    head = "| " + " | ".join(keys + ["images/s", "MFU", "step ms", "peak memory"]) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 4)]
    for r in rows:
        p = r["profile"]
        lines.append("| " + " | ".join([str(r["overrides"].get(k, "")) for k in keys] +
                                       [f"{p['img_per_s']:.1f}", f"{p['mfu'] * 100:.1f}%",
                                        f"{p['step_time_s'] * 1e3:.1f}", _fmt_bytes(p["peak_memory_bytes"])]) + " |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, len(rows) * 1.2), 3.5))
    labels = [",".join(f"{k.split('.')[-1]}={v}" for k, v in r["overrides"].items()) for r in rows]
    ax.bar(range(len(rows)), [r["profile"]["img_per_s"] for r in rows], color="#4c72b0")
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("images/s")
    ax.set_title("Sweep")
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=100)
    plt.close(fig)
