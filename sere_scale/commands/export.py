"""``sere-scale export --checkpoint RUN [--format timm-dir|safetensors] [--weights teacher|student]
[--push-to-hub USER/REPO [--private]] OUT``"""


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
    p.add_argument("--push-to-hub", metavar="USER/REPO", help="then upload the timm-dir folder (model card "
                                                             "included) to this Hugging Face Hub model repository")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    p.set_defaults(func=run, _parser=p)


def run(args) -> int:
    from sere_scale.export.timm_dir import default_format, export_timm
    out = args.out or args.out_opt
    if not out or (args.out and args.out_opt):
        args._parser.error("give the output once: OUT or --out OUT")
    if args.private and not args.push_to_hub:
        args._parser.error("--private goes with --push-to-hub")
    if args.push_to_hub and (args.format or default_format(out)) != "timm-dir":
        args._parser.error("--push-to-hub uploads a timm-dir folder: give a folder as OUT")
    res = export_timm(args.checkpoint, out, verify=not args.no_verify, fmt=args.format, weights=args.weights,
                      repo_id=args.push_to_hub)
    kind = "folder" if res["format"] == "timm-dir" else "file"
    card = " with a model card (README.md)" if kind == "folder" else ""
    print(f"wrote {kind} {res['file']}{card} ({res['weights']} backbone, step {res['step']}); load it with:")
    print("import timm")
    print(f"model = {res['call']}")
    if args.push_to_hub:
        from sere_scale.export.model_card import push_to_hub
        url = push_to_hub(res["file"], args.push_to_hub, private=args.private)
        print(f"uploaded to https://huggingface.co/{args.push_to_hub} ({url}); load it with:")
        print(f"model = timm.create_model('hf-hub:{args.push_to_hub}', pretrained=True)")
    return 0
