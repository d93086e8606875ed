"""SyncTokenBatchNorm at 2 ranks (gloo) equals a float64 BatchNorm over the global batch, forward and
backward through the differentiable all-reduce, and raises no (deprecation) warning."""
import subprocess
import sys

import torch

from tests.conftest import ROOT, subprocess_env


def test_sync_batchnorm_matches_a_global_float64_batchnorm_with_no_warning(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist" / "syncbn_run.py"), str(tmp_path)]
    res = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "deprecated" not in res.stderr, res.stderr[-3000:]
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 6, 5, generator=g) * 3 + 1).double().requires_grad_(True)
    w_out = torch.randn(2, 6, 5, generator=g).double()
    weight, bias = torch.linspace(0.5, 1.5, 5).double(), torch.linspace(-1, 1, 5).double()
    flat = x.reshape(-1, 5)
    mean, var = flat.mean(0), flat.var(0, unbiased=False)
    y = ((x - mean) / torch.sqrt(var + 1e-5) * weight + bias)
    (y * w_out).sum().backward()
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        assert got["warnings"] == []
        torch.testing.assert_close(got["y"].double(), y[r].detach(), rtol=1e-5, atol=1e-5)
        # the gradient reaches each rank's input through the other rank's statistics too
        torch.testing.assert_close(got["grad"].double(), x.grad[r], rtol=1e-4, atol=1e-5)
