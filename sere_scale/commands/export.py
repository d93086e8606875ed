"""``sere-scale export --checkpoint RUN --out FILE.safetensors``"""


def add_parser(sub):
    p = sub.add_parser("export", help="write the teacher backbone as timm ViT weights (.safetensors)")
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder (any backend)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--no-verify", action="store_true", help="skip the key/shape check against timm")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..export import export_timm
    res = export_timm(args.checkpoint, args.out, verify=not args.no_verify)
    print(f"wrote {res['file']} (teacher backbone, step {res['step']}); load it with:")
    print("import timm")
    print(f"model = {res['call']}")
    return 0
