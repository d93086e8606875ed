"""``sere-scale knn --checkpoint RUN --train-data DATA --val-data DATA``"""


def add_parser(sub):
    p = sub.add_parser("knn", help="k-NN evaluation of a checkpoint's teacher backbone")
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    p.add_argument("--train-data", required=True,
                   help="labelled training images: image folder ROOT/<class>/<image>, or WebDataset shards (a "
                        "sere-prep folder with _info.json [#SPLIT, default train], a list file or a brace pattern)")
    p.add_argument("--val-data", required=True,
                   help="labelled validation images: image folder or shards as --train-data ([#SPLIT, default val])")
    p.add_argument("--workers", type=int, default=0, help="data loader processes for feature extraction")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--random-init", action="store_true", help="evaluate the backbone at random init instead")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..eval.knn import knn_main
    return knn_main(args)
