"""Under torchrun (2 ranks, gloo): Sinkhorn-Knopp on each rank's rows (rank r: rows [r·B, (r+1)·B) of one shared
matrix, rank 1 also given a rank-local shift of the whole matrix's maximum); each rank writes its targets."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from sere_scale.losses.sinkhorn import sinkhorn_knopp


def main():
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(0)  # the same stream on every rank: the test rebuilds the same matrix
    logits = torch.randn(2 * 5, 7, generator=g, dtype=torch.float64)
    q = sinkhorn_knopp(logits[rank * 5:(rank + 1) * 5].float(), 0.5, 3)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(q.tolist()))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
