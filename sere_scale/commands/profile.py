"""``sere-scale profile --config FILE [--synthetic] [--steps N] [--trace] [--sweep key=a,b ...] [key=value ...]``

Runs real training steps (any backend, any world size under a launcher) and writes ``profile.json``,
``profile.md`` and PNG plots into ``output_dir`` (a sweep writes ``sweep.json|md|png`` and one sub-folder per
point).
"""
import itertools


def add_parser(sub):
    from sere_scale.cli import add_config_args
    p = sub.add_parser("profile", help="measure images/s, MFU, step breakdown and memory")
    add_config_args(p)
    p.add_argument("--synthetic", action="store_true", help="random batches: the model alone, no data cost")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--trace", action="store_true", help="also write a torch profiler trace (Perfetto/TensorBoard)")
    p.add_argument("--baseline", action="store_true",
                   help="also time the bare timm backbones (student fwd+bwd on all crops, teacher fwd on globals)")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="profile every combination of these values (repeatable)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from sere_scale.config.load import load_config
    from sere_scale.engine.distributed import init_distributed
    from sere_scale.profiling.report import write_profile, write_sweep
    from sere_scale.run.profiler import run_profile
    info = init_distributed()
    base = load_config(args.config, args.overrides)
    axes = []
    for s in args.sweep:
        key, _, vals = s.partition("=")
        axes.append([(key, v) for v in vals.split(",")])
    points = [dict(c) for c in itertools.product(*axes)] if axes else [{}]
    rows = []
    for point in points:
        cfg = load_config(args.config, [*args.overrides, *(f"{k}={v}" for k, v in point.items())])
        out = Path(base.output_dir) / ("_".join(f"{k}-{v}" for k, v in point.items()) if point else "")
        res = run_profile(cfg, args.steps, args.warmup, args.synthetic, args.trace, info, str(out))
        if args.baseline:
            from sere_scale.profiling.baseline import backbone_baseline
            res.update(backbone_baseline(cfg, info.device, args.steps, args.warmup))
            res["speed_vs_baseline"] = res["img_per_s_per_device"] / res["baseline_img_per_s"]
        if info.is_main:
            write_profile(res, out)
            print(f"{point or cfg.model.arch}: {res['img_per_s']:.1f} images/s, MFU {res['mfu'] * 100:.1f}%, "
                  f"step {res['step_time_s'] * 1e3:.1f} ms, bottleneck: {res['bottleneck']} → {out}/profile.md")
        rows.append({"overrides": point, "profile": res})
    if axes and info.is_main:
        write_sweep(rows, base.output_dir)
        print(f"sweep table: {Path(base.output_dir) / 'sweep.md'}")
    return 0
