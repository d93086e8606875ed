"""``sere-scale invariance --checkpoint RUN --data DIR [--out FILE]``"""


def add_parser(sub):
    from sere_scale.models.source import add_source_args
    p = sub.add_parser("invariance",
                       help="mean change of spatial and channel self-relations between two views")
    add_source_args(p)
    p.add_argument("--data", required=True,
                   help="image folder (searched recursively), e.g. a validation set, or WebDataset shards (a "
                        "sere-prep folder with _info.json [#SPLIT, default val], a list file or a brace pattern)")
    p.add_argument("--out", default=None, help="also write the result as JSON to this file")
    p.add_argument("--max-images", type=int, default=None, help="at most this many images (evenly spread)")
    p.add_argument("--strength", default="train",
                   help="'train' (the run's global-crop recipe) or a number in [0, 1] (docs/VISUALIZE.md)")
    p.add_argument("--size", type=int, default=None, help="view size (default: the run's global crop size)")
    p.add_argument("--heads", type=int, default=None, help="relation heads (default: sere.heads or attention "
                                                          "heads)")
    p.add_argument("--relation-size", type=int, default=None, help="S of the overlap grid (default: "
                                                                   "sere.spatial_size_global)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="seed of the views")
    p.add_argument("--no-standardize", action="store_true", help="relations of the raw pre-norm features")
    p.set_defaults(func=run)


def run(args) -> int:
    from sere_scale.eval.invariance import invariance_main
    return invariance_main(args)
