"""``sere-scale plan -c CONFIG --gpus N [--gpus-per-node 8] [--gpu h100|h200|a100-80g|a100-40g|b200|custom
(--gpu-mem-gib --gpu-tflops --hbm-gbs)] [--intra-gbs] [--inter-gbs] [--backends ...] [--json OUT]
[--calibrate PROFILE.json] [--processes P] [key=value ...]``

Predicts, before renting the GPUs, per-rank memory (model states, activations with and without activation
checkpointing, peak), per-step collective bytes and time, compute time, images/s per GPU and scaling
efficiency at N and at 8/64/256/512 GPUs, for each backend; marks what does not fit, recommends one and
prints its launch lines. One real training step is traced for N ranks in this process (sere_scale/plan,
docs/SCALING.md); runs on a CPU, no GPU needed.
"""


def add_parser(sub):
    from sere_scale.cli import add_config_args
    from sere_scale.plan.hardware import GPU_NAMES
    from sere_scale.plan.planner import BACKENDS
    p = sub.add_parser("plan", help="predict memory, communication and throughput at N GPUs (no GPU needed)")
    add_config_args(p)
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs (world size)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", default="h100", choices=GPU_NAMES)
    p.add_argument("--gpu-mem-gib", type=float, help="GPU memory (GiB): overrides the table / for --gpu custom")
    p.add_argument("--gpu-tflops", type=float, help="dense bf16 peak TFLOP/s: overrides the table / custom")
    p.add_argument("--hbm-gbs", type=float, help="HBM bandwidth GB/s: overrides the table / custom")
    p.add_argument("--intra-gbs", type=float, default=400.0, help="GB/s per GPU within a node (default 400)")
    p.add_argument("--inter-gbs", type=float, default=50.0,
                   help="GB/s per GPU between nodes (default 50 = 400 Gb/s)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for compute time")
    p.add_argument("--calibrate", metavar="PROFILE_JSON",
                   help="a `sere-scale profile` result from one GPU: its measured step replaces the FLOPs model")
    p.add_argument("--backends", default="all",
                   help=f"comma-separated subset of {','.join(BACKENDS)}, 'configured' or 'all'")
    p.add_argument("--processes", type=int, metavar="P",
                   help="trace in P processes side by side (default: one per CPU core)")
    p.add_argument("--json", metavar="OUT", help="write the plan as JSON")
    p.add_argument("--md", metavar="OUT", help="write the markdown table")
    p.add_argument("--plot", metavar="OUT_PNG", help="write the scaling curve")
    p.set_defaults(func=run)


def _backends(spec: str, cfg) -> list[str]:
    from sere_scale.config.load import ConfigError
    from sere_scale.plan.planner import BACKENDS, configured_backend
    if spec == "all":
        return list(BACKENDS)
    if spec == "configured":
        return [configured_backend(cfg)]
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in BACKENDS]
    if bad:
        raise ConfigError(f"--backends: unknown {', '.join(bad)} (choose from {', '.join(BACKENDS)})")
    return names


def _calibration(path):
    import json
    from pathlib import Path

    from sere_scale.config.load import ConfigError
    if not path:
        return None
    try:
        prof = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--calibrate: cannot read '{path}': {e}") from None
    if "profile" in prof:  # a sweep row
        prof = prof["profile"]
    missing = [k for k in ("step_time_s", "flops_per_step") if not prof.get(k)]
    if missing:
        raise ConfigError(f"--calibrate: '{path}' lacks {', '.join(missing)} (a `sere-scale profile` profile.json)")
    if prof.get("world_size", 1) != 1:
        raise ConfigError(f"--calibrate: '{path}' was measured on {prof['world_size']} ranks; profile one GPU")
    return prof


def build_result(args, log=print) -> dict:
    from sere_scale.config.load import ConfigError, load_config
    from sere_scale.plan.estimate import CURVE
    from sere_scale.plan.hardware import USABLE, Links, gpu_spec
    from sere_scale.plan.planner import make_plans, plan_rows
    from sere_scale.plan.report import launch_lines
    if args.gpus < 1 or args.gpus_per_node < 1:
        raise ConfigError("--gpus and --gpus-per-node must be at least 1")
    if getattr(args, "processes", None) is not None and args.processes < 1:
        raise ConfigError("--processes must be at least 1")
    try:
        gpu = gpu_spec(args.gpu, args.gpu_mem_gib, args.gpu_tflops, args.hbm_gbs)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    links = Links(args.gpus_per_node, args.intra_gbs, args.inter_gbs)
    base = load_config(args.config, args.overrides)
    precision = [] if base.train.precision != "auto" else ["train.precision=bf16"]  # as on the GPUs

    def load(extra):
        return load_config(args.config, [*args.overrides, *precision, "data.num_workers=0", *extra])
    calib = _calibration(args.calibrate)
    plans = make_plans(load, args.gpus, args.gpus_per_node, _backends(args.backends, base),
                       USABLE * gpu.mem_bytes, log=log, processes=getattr(args, "processes", None))
    rows, best = plan_rows(plans, args.gpus, gpu, links, args.mfu, calib)
    return {
        "gpus": args.gpus, "plans": rows, "recommended": best,
        "gpu": {"name": gpu.name, "mem_bytes": gpu.mem_bytes, "peak_flops": gpu.peak_flops, "hbm_gbs": gpu.hbm_gbs,
                "usable_fraction": USABLE},
        "links": {"gpus_per_node": links.gpus_per_node, "intra_gbs": links.intra_gbs, "inter_gbs": links.inter_gbs},
        "compute_model": (f"measured step from {args.calibrate} scaled by FLOPs" if calib
                          else f"MFU {args.mfu:.0%} of the dense bf16 peak"),
        "curve_sizes": list(CURVE),
        "launch": (launch_lines(rows[best], args.config, args.gpus, args.gpus_per_node, args.overrides)
                   if best is not None else None),
    }


def run(args) -> int:
    import sys

    from sere_scale.plan.report import markdown, write
    result = build_result(args, log=lambda m: print(m, file=sys.stderr))
    write(result, args.json, args.md, args.plot)
    print(markdown(result))
    return 0 if result["recommended"] is not None else 3
