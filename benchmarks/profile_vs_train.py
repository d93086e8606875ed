"""The profiler measures the step that trains: its step time against the training loop's, side by side.

    OMP_NUM_THREADS=1 python benchmarks/profile_vs_train.py --rounds 3 --steps 8
    python benchmarks/profile_vs_train.py -c configs/demo.yaml --data demo_data/train data.batch_size=64

Each round runs, in one process and on the same data, (a) ``sere-scale train``'s loop (``Trainer``) for
``2·steps`` steps with ``train.log_every=steps``, its step time = global batch / the second window's images/s,
and (b) ``run_profile`` (``--steps steps``), its ``step_time_s``. Prints both per round and the median ratio
profile / train (1.0 = the same step; the machines are noisy: compare the ratio, not the times).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.arch=vit_tiny_cpu", "model.depth=2", "data.global_size=32", "data.local_size=16", "data.n_local=2",
        "data.batch_size=16", "data.num_workers=0", "image_loss.out_dim=64", "image_loss.hidden_dim=32",
        "image_loss.bottleneck_dim=16", "sere.spatial_size_global=3", "sere.spatial_size_local=2",
        "train.precision=fp32", "train.progress=false", "train.log_mfu=false", "checkpoint.every_steps=100000"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--config", default=None, help="a config file (default: the tiny CPU model)")
    ap.add_argument("--data", default=None, help="image folder (default: the digits demo set, written to a tmp dir)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import logging

    from sere_scale.config.load import load_config
    from sere_scale.data.demo_data import write_digits
    from sere_scale.run.metrics import read_metrics
    from sere_scale.run.profiler import run_profile
    from sere_scale.run.train import train
    logging.getLogger("sere_scale").setLevel(logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or str(write_digits(Path(tmp) / "digits", size=32) / "train")
        base = ([] if args.config else TINY) + [f"data.path={data}", *args.overrides]
        for r in range(args.rounds):
            run = Path(tmp) / f"train{r}"
            cfg = load_config(args.config, [*base, f"output_dir={run}", f"train.max_steps={2 * args.steps}",
                                            f"train.log_every={args.steps}"])
            train(cfg)
            window = read_metrics(run)[-1]  # steps steps+1 .. 2*steps
            t_train = cfg.data.batch_size * cfg.train.grad_accum / window["img_per_s"]
            pcfg = load_config(args.config, [*base, f"output_dir={Path(tmp) / f'prof{r}'}"])
            t_prof = run_profile(pcfg, steps=args.steps, warmup=args.warmup)["step_time_s"]
            rows.append((t_train, t_prof))
            print(f"round {r}: train {1e3 * t_train:.1f} ms/step, profile {1e3 * t_prof:.1f} ms/step, "
                  f"ratio {t_prof / t_train:.3f}", flush=True)
    ratio = statistics.median(p / t for t, p in rows)
    print(f"median ratio profile/train over {args.rounds} rounds: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
