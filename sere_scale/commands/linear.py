"""``sere-scale linear --checkpoint RUN --train-data DATA --val-data DATA [--out DIR]``"""
from sere_scale.commands import add_eval_data_args


def add_parser(sub):
    p = sub.add_parser("linear", help="linear probe on the frozen teacher backbone (features cached on disk)")
    add_eval_data_args(p)
    p.add_argument("--out", default="", help="folder for the feature cache and results (default: RUN/linear)")
    p.add_argument("--lrs", default="", help="comma-separated learning rates to sweep (default 0.03,...,3)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64, help="batch size of the feature extraction")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--random-init", action="store_true", help="probe the backbone at random init instead")
    p.set_defaults(func=run)


def run(args) -> int:
    from sere_scale.eval.linear import linear_main
    return linear_main(args)
