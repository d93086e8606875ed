"""``sere-scale davis --checkpoint RUN --data DAVIS_ROOT [--subset val] [--out DIR]``: semi-supervised video
object segmentation by label propagation (DINO's protocol), scored as the DAVIS-2017 toolkit scores it;
``--evaluate-only RESULTS`` scores any method's result folder (docs/EVAL.md, "Dense evaluation")."""
import json
import sys
from pathlib import Path


def add_parser(sub):
    p = sub.add_parser("davis", help="DAVIS-2017 video object segmentation by label propagation: J&F")
    p.add_argument("--data", required=True, help="DAVIS root (JPEGImages/480p, Annotations/480p, ImageSets/2017)")
    p.add_argument("--checkpoint", help="run or checkpoint folder (its EMA teacher), exported timm folder, weight "
                                        "file (with --arch), or hf-hub:NAME")
    p.add_argument("--evaluate-only", metavar="RESULTS", help="score this folder of result PNGs, propagate nothing")
    p.add_argument("--subset", default="val")
    p.add_argument("--weights", choices=("teacher", "student"), default="teacher")
    p.add_argument("--arch", help="architecture of a bare weight file")
    p.add_argument("--short-side", type=int, default=480)
    p.add_argument("--n-last-frames", type=int, default=7)
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--size-mask-neighborhood", "--neighborhood", dest="neighborhood", type=int, default=12)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="davis_results", help="folder for the PNGs, the CSVs and davis.json")
    p.set_defaults(func=run)


def run(args) -> int:
    if bool(args.checkpoint) == bool(args.evaluate_only):
        print("error: give --checkpoint (propagate, then score) or --evaluate-only RESULTS (score only)",
              file=sys.stderr)
        return 2
    if args.evaluate_only:
        from sere_scale.eval.dense.davis import evaluate_davis
        res = evaluate_davis(args.data, args.evaluate_only, args.subset)
        Path(args.evaluate_only, "davis.json").write_text(json.dumps(res, indent=1))
    else:
        from sere_scale.eval.dense.vos import run_davis
        res = run_davis(args.checkpoint, args.data, args.out, args.subset, weights=args.weights, arch=args.arch,
                        short_side=args.short_side, n_last_frames=args.n_last_frames, topk=args.topk,
                        temperature=args.temperature, neighborhood=args.neighborhood, device=args.device)
    print(json.dumps({k: v for k, v in res.items() if k != "per_object"} | {"objects": len(res["per_object"])}))
    return 0
