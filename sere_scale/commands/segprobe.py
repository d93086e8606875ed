"""``sere-scale segprobe --checkpoint RUN --data ROOT [--method linear|linear-cached|nn] [--out DIR]``:
semantic segmentation probes of a frozen backbone (docs/EVAL.md, "Dense evaluation")."""
import json


def add_parser(sub):
    p = sub.add_parser("segprobe", help="segmentation probe (linear or nearest-neighbour) of a frozen backbone: mIoU")
    p.add_argument("--checkpoint", required=True,
                   help="run or checkpoint folder (its EMA teacher), exported timm folder, weight file (with "
                        "--arch), or hf-hub:NAME")
    p.add_argument("--data", required=True, help="Pascal VOC 2012, ADE20K, Cityscapes, or images/ + masks/ (generic)")
    p.add_argument("--method", choices=("linear", "linear-cached", "nn"), default="linear")
    p.add_argument("--weights", choices=("teacher", "student"), default="teacher")
    p.add_argument("--arch", help="architecture of a bare weight file")
    p.add_argument("--size", type=int, default=512, help="short side of the images (inference and memory bank)")
    p.add_argument("--crop", type=int, help="linear: training crop and sliding window (default --size)")
    p.add_argument("--layers", type=int, default=1, help="last n layers concatenated (1 or 4 in the protocols)")
    p.add_argument("--iters", type=int, default=40_000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--inference", choices=("whole", "slide"), default="whole")
    p.add_argument("--memory-size", type=int, default=102_400, help="nn: patches in the memory bank")
    p.add_argument("--k", type=int, default=30, help="nn: neighbours")
    p.add_argument("--num-classes", type=int, help="generic layout: number of classes")
    p.add_argument("--ignore-index", type=int, help="generic layout: label to ignore")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder for segprobe.json")
    p.set_defaults(func=run)


def run(args) -> int:
    from sere_scale.eval.dense.segprobe import run_segprobe
    res = run_segprobe(args.checkpoint, args.data, args.method, args.size, args.crop, args.layers, args.iters,
                       args.batch_size, args.memory_size, args.num_classes, args.ignore_index, args.out, args.device,
                       arch=args.arch, k=args.k, lr=args.lr, inference=args.inference, seed=args.seed,
                       num_workers=args.workers, weights=args.weights)
    print(json.dumps(res))
    return 0
