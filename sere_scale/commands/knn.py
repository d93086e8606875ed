"""``sere-scale knn --checkpoint RUN --train-data DATA --val-data DATA``"""
from sere_scale.commands import add_eval_data_args


def add_parser(sub):
    p = sub.add_parser("knn", help="k-NN evaluation of a checkpoint's teacher backbone")
    add_eval_data_args(p)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--random-init", action="store_true", help="evaluate the backbone at random init instead")
    p.set_defaults(func=run)


def run(args) -> int:
    from sere_scale.eval.knn import knn_main
    return knn_main(args)
