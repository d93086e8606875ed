"""``sere-scale export --checkpoint RUN [--format timm-dir|safetensors] [--weights teacher|student] OUT``"""


def add_parser(sub):
    from sere_scale.export.timm_dir import FORMATS, WEIGHTS
    p = sub.add_parser("export", help="write the teacher (or student) backbone for timm: a timm-dir folder "
                                      "(config.json + model.safetensors) or one .safetensors file")
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder (any backend)")
    p.add_argument("out", nargs="?", help="output folder (timm-dir) or .safetensors file")
    p.add_argument("--out", dest="out_opt", help="same as the positional OUT")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="timm-dir (default for a folder target) or safetensors (default for *.safetensors)")
    p.add_argument("--weights", choices=WEIGHTS, default="teacher", help="EMA teacher (default) or student")
    p.add_argument("--no-verify", action="store_true", help="skip the key/shape check against timm")
    p.set_defaults(func=run, _parser=p)


def run(args) -> int:
    from sere_scale.export.timm_dir import export_timm
    out = args.out or args.out_opt
    if not out or (args.out and args.out_opt):
        args._parser.error("give the output once: OUT or --out OUT")
    res = export_timm(args.checkpoint, out, verify=not args.no_verify, fmt=args.format, weights=args.weights)
    kind = "folder" if res["format"] == "timm-dir" else "file"
    print(f"wrote {kind} {res['file']} ({res['weights']} backbone, step {res['step']}); load it with:")
    print("import timm")
    print(f"model = {res['call']}")
    return 0
