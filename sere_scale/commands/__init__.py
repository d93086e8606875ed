"""Sub-commands of ``sere-scale``, one module each exposing ``add_parser(subparsers)`` (registered in
``sere_scale/cli.py``): train, knn, linear, profile, visualize, invariance, export, config, demo.

Imports: any layer (run, eval, viz, export, profiling, models, data, engine, config): this is the top layer.
Imported by: ``sere_scale.cli`` only.
"""


def add_eval_data_args(p) -> None:
    """``--checkpoint``, ``--train-data``, ``--val-data`` and ``--workers``, shared by ``knn`` and ``linear``."""
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    p.add_argument("--train-data", required=True,
                   help="labelled training images: image folder ROOT/<class>/<image>, or WebDataset shards (a "
                        "sere-prep folder with _info.json [#SPLIT, default train], a list file or a brace pattern)")
    p.add_argument("--val-data", required=True,
                   help="labelled validation images: image folder or shards as --train-data ([#SPLIT, default val])")
    p.add_argument("--workers", type=int, default=0, help="data loader processes for feature extraction")
