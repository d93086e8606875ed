"""``sere-scale visualize --checkpoint RUN --images PATHS... --out DIR``"""


def add_parser(sub):
    from sere_scale.models.source import add_source_args
    p = sub.add_parser("visualize",
                       help="CLS attention, spatial and channel self-relation pictures per image")
    add_source_args(p)
    p.add_argument("--images", nargs="+", required=True, help="image files or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output folder for the PNGs and index.json")
    p.add_argument("--max-images", type=int, default=None,
                   help="at most this many images (spread over a folder's classes)")
    p.add_argument("--size", type=int, default=None, help="model input size (default: the run's global crop "
                                                         "size, or the timm file's image size)")
    p.add_argument("--panel", type=int, default=160, help="panel size in pixels")
    p.add_argument("--mass", type=float, default=0.6, help="attention mass kept by the threshold (DINO: 0.6)")
    p.add_argument("--points", nargs="+", default=None, metavar="X,Y",
                   help="query cells as x,y in [0,1] of the overlap region (default: centre and two others)")
    p.add_argument("--strength", default="train",
                   help="augmentation of the two views: 'train' (the run's global-crop recipe) or a number "
                        "in [0, 1] (see docs/VISUALIZE.md)")
    p.add_argument("--seed", type=int, default=0, help="seed of the two views")
    p.add_argument("--heads", type=int, default=None, help="relation heads (default: sere.heads or attention "
                                                          "heads)")
    p.add_argument("--relation-size", type=int, default=None,
                   help="S of the S×S overlap grid (default: the view's patch grid)")
    p.add_argument("--no-standardize", action="store_true", help="relations of the raw pre-norm features")
    p.set_defaults(func=run)


def run(args) -> int:
    from sere_scale.viz.write import visualize_main
    return visualize_main(args)
