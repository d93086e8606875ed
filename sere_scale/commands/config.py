"""``sere-scale config -c FILE [-c FILE2 ...] [key=value ...]``: print the merged, resolved, validated config
as YAML (exactly what ``train`` would run with and write to ``config.yaml``); exit 2 on a config error."""


def add_parser(sub):
    from sere_scale.cli import add_config_args
    p = sub.add_parser("config", help="print the resolved, validated config (YAML) and exit")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    import yaml

    from sere_scale.config.load import load_config
    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return 0
