"""Under torchrun (2 ranks, gloo): MoCoV3Loss with per-rank queries and keys; each rank writes its loss."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from sere_scale.losses.mocov3 import MoCoV3Loss


def main():
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    B, D = 3, 5
    g = torch.Generator().manual_seed(0)  # same stream on every rank: the test rebuilds the same tensors
    q = [[torch.randn(B, D, generator=g) for _ in range(2)] for _ in range(2)]
    k = [[torch.randn(B, D, generator=g) for _ in range(2)] for _ in range(2)]
    loss, _ = MoCoV3Loss(0.2)(q[rank], k[rank])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({"loss": loss.item()}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
