"""``sere-scale linear --checkpoint RUN --train-data DATA --val-data DATA [--out DIR]``"""


def add_parser(sub):
    p = sub.add_parser("linear", help="linear probe on the frozen teacher backbone (features cached on disk)")
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    p.add_argument("--train-data", required=True,
                   help="labelled training images: image folder ROOT/<class>/<image>, or WebDataset shards (a "
                        "sere-prep folder with _info.json [#SPLIT, default train], a list file or a brace pattern)")
    p.add_argument("--val-data", required=True,
                   help="labelled validation images: image folder or shards as --train-data ([#SPLIT, default val])")
    p.add_argument("--workers", type=int, default=0, help="data loader processes for feature extraction")
    p.add_argument("--out", default="", help="folder for the feature cache and results (default: RUN/linear)")
    p.add_argument("--lrs", default="", help="comma-separated learning rates to sweep (default 0.03,...,3)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64, help="batch size of the feature extraction")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--random-init", action="store_true", help="probe the backbone at random init instead")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..eval.linear import linear_main
    return linear_main(args)
