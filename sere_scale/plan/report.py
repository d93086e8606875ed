"""The plan as a markdown table, JSON (the issue's format, plus details), a plot of the scaling curve, and the
launch lines for the recommended plan."""
from __future__ import annotations

import json
from pathlib import Path

from sere_scale.plan.hardware import GIB


def _gib(b) -> str:
    return f"{b / GIB:.1f}" if b is not None else "—"


def plan_label(row: dict) -> str:
    s = row["backend"] + ("" if row["strategy"] in ("replicate",) else f" {row['strategy']}")
    return s + (" +AC" if row["checkpoint_activations"] else "")


def overrides_of(row: dict, gpus_per_node: int) -> list[str]:
    """The config overrides that select this plan."""
    out = [f"engine.backend={row['backend']}"]
    if row["backend"] == "fsdp":
        out.append(f"engine.fsdp_strategy={row['strategy']}")
        if row["strategy"] == "hybrid":
            out.append(f"engine.fsdp_node_size={gpus_per_node}")
    if row["backend"] == "deepspeed":
        out.append(f"engine.zero_stage={row['strategy'].removeprefix('zero')}")
    out += [f"model.checkpoint_activations={str(row['checkpoint_activations']).lower()}",
            f"data.batch_size={row['batch_size']}", f"train.grad_accum={row['grad_accum']}"]
    return out


def launch_lines(row: dict, configs: list[str], gpus: int, gpus_per_node: int, extra=()) -> dict:
    """``sere-scale train`` (one node), ``torchrun`` and ``sbatch`` lines; ``extra``: the user's own overrides,
    less the keys the plan sets."""
    cfg = " ".join(f"-c {c}" for c in configs)
    plan_ov = overrides_of(row, gpus_per_node)
    keys = {o.split("=", 1)[0] for o in plan_ov}
    ov = " ".join([*(o for o in extra if o.split("=", 1)[0] not in keys), *plan_ov])
    nodes = max(gpus // gpus_per_node, 1)
    per_node = min(gpus, gpus_per_node)
    train = f"sere-scale train {cfg} {ov}"
    if nodes == 1:
        torchrun = f"torchrun --standalone --nproc-per-node {per_node} -m sere_scale train {cfg} {ov}"
    else:
        torchrun = (f"torchrun --nnodes {nodes} --nproc-per-node {per_node} --rdzv-backend c10d "
                    f"--rdzv-endpoint $NODE0:29500 --rdzv-id $JOB -m sere_scale train {cfg} {ov}")
    sbatch = f"sbatch --nodes {nodes} slurm/train_torchrun.sbatch {' '.join(configs)} {ov}"
    return {"train": train, "torchrun": torchrun, "sbatch": sbatch}


def markdown(result: dict) -> str:
    n = result["gpus"]
    lines = [f"Plan for {n} × {result['gpu']['name']} ({result['links']['gpus_per_node']} per node, "
             f"{result['links']['intra_gbs']:.0f} GB/s within a node, {result['links']['inter_gbs']:.0f} GB/s per "
             f"GPU between nodes), compute at {result['compute_model']}.", "",
             "| # | plan | batch/GPU × accum | fits | model states GiB | activations GiB | peak GiB | "
             "AG / RS / AR / BC MiB per step | compute ms | comm ms | step ms | img/s/GPU | efficiency | "
             + " | ".join(f"eff@{k}" for k in result["curve_sizes"]) + " | source |",
             "|" + "---|" * (14 + len(result["curve_sizes"]))]
    for i, r in enumerate(result["plans"]):
        pr, ps = r["per_rank"], r["per_step"]
        cb = ps["comm_bytes"]
        mib = " / ".join(f"{cb[k] / 2**20:.0f}" for k in ("all_gather", "reduce_scatter", "all_reduce", "broadcast"))
        mark = " **(recommended)**" if i == result["recommended"] else ""
        curve = " | ".join(f"{r['curve'][str(k)]['scaling_efficiency'] * 100:.0f} %" for k in result["curve_sizes"])
        lines.append(f"| {i} | {plan_label(r)}{mark} | {r['batch_size']} × {r['grad_accum']} | "
                     f"{'yes' if r['fits'] else '**no**'} | {_gib(pr['model_states_bytes'])} | "
                     f"{_gib(pr['activations_bytes'])} | {_gib(pr['peak_bytes'])} | {mib} | "
                     f"{ps['compute_s'] * 1e3:.0f} | {ps['comm_s'] * 1e3:.0f} | {ps['step_s'] * 1e3:.0f} | "
                     f"{r['images_per_s_per_gpu']:.0f} | {r['scaling_efficiency'] * 100:.0f} % | {curve} | "
                     f"{r['source'].split(':')[0].split(';')[0]} |")
    lines.append("")
    if result["recommended"] is None:
        lines.append("Nothing fits: fewer images per GPU, activation checkpointing or more GPUs.")
    else:
        lines += ["Launch (recommended plan):", "```", *result["launch"].values(), "```"]
    return "\n".join(lines) + "\n"


def write(result: dict, json_path: str | None = None, md_path: str | None = None,
          plot_path: str | None = None) -> None:
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=1))
    if md_path:
        Path(md_path).write_text(markdown(result))
    if plot_path:
        plot(result, plot_path)


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = result["curve_sizes"]
    for r in result["plans"]:
        if r["fits"]:
            ax.plot(sizes, [r["curve"][str(k)]["images_per_s_per_gpu"] for k in sizes], marker="o",
                    label=f"{plan_label(r)} b{r['batch_size']}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("GPUs")
    ax.set_ylabel("predicted images/s per GPU")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
