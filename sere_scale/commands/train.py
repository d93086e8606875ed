"""``sere-scale train --config FILE [key=value ...] [--resume | --move-old]``"""


def add_parser(sub):
    from sere_scale.cli import add_config_args
    p = sub.add_parser("train", help="pretrain (one process, or DDP/FSDP/DeepSpeed under a launcher)")
    add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("--move-old", action="store_true",
                   help="output_dir holds another run: rename it to <output_dir>.old-N and start afresh")
    p.set_defaults(func=run)


def run(args) -> int:
    from sere_scale.config.load import load_config
    from sere_scale.run.train import main_train
    cfg = load_config(args.config, args.overrides)
    return main_train(cfg, args.resume, args.move_old)
