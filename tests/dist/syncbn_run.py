"""2-rank worker: SyncTokenBatchNorm forward + backward on each rank's half of a fixed batch, with every
warning recorded. Writes ``OUT/rank{r}.pt`` with the output, input gradient and warning messages."""
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from sere_scale.models.heads import SyncTokenBatchNorm


def main(out: Path):
    dist.init_process_group("gloo")
    r = dist.get_rank()
    g = torch.Generator().manual_seed(0)
    x_full = torch.randn(2, 6, 5, generator=g) * 3 + 1  # [rank, tokens, channels]
    w_out = torch.randn(2, 6, 5, generator=g)
    bn = SyncTokenBatchNorm(5)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, 5))
        bn.bias.copy_(torch.linspace(-1, 1, 5))
    x = x_full[r].clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = bn(x)
        (y * w_out[r]).sum().backward()
    torch.save({"y": y.detach(), "grad": x.grad, "warnings": [str(w.message) for w in caught]},
               out / f"rank{r}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
