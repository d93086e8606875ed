"""relation_cross_entropy stays exact when relations are sharp (logits >= 100, loss << 1): every implementation's
loss and student-gradient errors against float64 are at most 4x those of the plain fp32 formula on the same
inputs. The Triton kernels run under TRITON_INTERPRET=1 in a subprocess (fp32 and fp16), natively too with CUDA."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sere_scale.kernels import relation_cross_entropy
from sere_scale.kernels.chunked import relation_ce_rows_chunked
from sere_scale.kernels.plain import weighted_mean
from tests.relation_reference import reference_grad, reference_loss

ROOT = Path(__file__).resolve().parents[1]
FACTOR = 4.0
ULP = 2.0 ** -23  # no implementation is asked to beat one fp32 rounding of the result
SMALL = {"block_m": 16, "block_n": 16, "block_k": 16, "block_d": 16}
# name: (G, R, Ds, Dt, rows, student scale, teacher scale, weights, triton blocks); rows: ("std", σ) Gaussian
# entries, ("norm", r) random directions of length r (the diagonal is then every row's largest logit)
CASES = {
    # the case: logits ~300, loss ~1e-4
    "issue": (12, 169, 64, 64, ("std", 1.5), 1.25, 0.25, None, None),
    "odd-sizes": (3, 37, 20, 11, ("norm", 10.0), 1.5, 0.5, None, SMALL),
    "zero-weights": (4, 29, 13, 13, ("norm", 12.0), 0.8, 0.25, [0.0, 1.5, 0.0, 2.0], SMALL),
    "channel-like": (2, 45, 9, 33, ("norm", 11.0), 1.2, 0.22, None, SMALL),
}


def _inputs(name, dtype=torch.float32):
    G, R, Ds, Dt, (kind, size), a, b, w, _ = CASES[name]
    gen = torch.Generator().manual_seed(sorted(CASES).index(name))
    s = torch.randn(G, R, Ds, generator=gen, dtype=torch.float64)
    t = torch.randn(G, R, Dt, generator=gen, dtype=torch.float64)
    if kind == "norm":
        s, t = torch.nn.functional.normalize(s, dim=-1), torch.nn.functional.normalize(t, dim=-1)
    return (s * size).to(dtype), (t * size).to(dtype), a, b, None if w is None else torch.tensor(w)


def _errors(loss, grad, ref, ref_g):
    return (abs(loss.double().item() - ref.item()) / abs(ref.item()),
            ((grad.double() - ref_g).norm() / ref_g.norm()).item())


def _run_impl(s, t, a, b, w, impl, **kw):
    x = s.clone().requires_grad_(True)
    if impl == "chunked-small":
        loss = weighted_mean(relation_ce_rows_chunked(x, t, a, b, block_rows=7), w)
    else:
        loss = relation_cross_entropy(x, t, a, b, weights=w, impl=impl)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g


def _check(name, dtype, loss, grad, impl):
    s, t, a, b, w = _inputs(name, dtype)
    ref, ref_g = reference_loss(s, t, a, b, w), reference_grad(s, t, a, b, w)
    assert ref.item() < 0.05  # the cases are sharp: the loss is far below log R
    S = a * torch.einsum("gid,gjd->gij", s.double(), s.double())
    assert S.max().item() >= 100
    plain_loss, plain_grad = _run_impl(s, t, a, b, w, "plain")
    e_plain = _errors(plain_loss, plain_grad, ref, ref_g)
    e = _errors(loss, grad, ref, ref_g)
    assert torch.isfinite(grad).all() and grad.dtype == s.dtype
    for what, err, base in (("loss", e[0], e_plain[0]), ("gradient", e[1], e_plain[1])):
        assert err <= FACTOR * max(base, ULP), f"{impl} {name} {dtype}: {what} error {err:.2e}, plain {base:.2e}"
    if w is not None:  # groups of weight 0 get no gradient
        assert torch.count_nonzero(grad[w == 0]) == 0


@pytest.mark.parametrize("impl", ["plain", "chunked", "chunked-small", "auto"])
@pytest.mark.parametrize("name", list(CASES))
def test_sharp_relations_cpu(name, impl):
    s, t, a, b, w = _inputs(name)
    loss, g = _run_impl(s, t, a, b, w, impl)
    _check(name, torch.float32, loss, g, impl)


RUNNER = r"""
import sys, torch
from sere_scale.kernels.plain import weighted_mean
from sere_scale.kernels.triton_relation import TritonBlocks, relation_ce_rows_triton
cases, device = torch.load(sys.argv[1]), sys.argv[3]
out = {}
for key, (s, t, a, b, w, blocks) in cases.items():
    s = s.to(device).requires_grad_(True)
    w = None if w is None else w.to(device)
    loss = weighted_mean(relation_ce_rows_triton(s, t.to(device), a, b, TritonBlocks(**(blocks or {}))), w)
    (g,) = torch.autograd.grad(loss, s)
    out[key] = (loss.detach().cpu(), g.cpu())
torch.save(out, sys.argv[2])
"""

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=DEVICES)
def triton_results(request, tmp_path_factory):
    pytest.importorskip("triton")
    tmp = tmp_path_factory.mktemp(f"sharp-{request.param}")
    cases = {(name, dt): (*_inputs(name, dtype), CASES[name][-1]) for name in CASES for dt, dtype in DTYPES.items()}
    torch.save(cases, tmp / "in.pt")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if request.param == "cpu":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(tmp / "in.pt"), str(tmp / "out.pt"), request.param],
                          check=False, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(tmp / "out.pt")


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("name", list(CASES))
def test_sharp_relations_triton(triton_results, name, dt):
    loss, g = triton_results[(name, dt)]
    _check(name, DTYPES[dt], loss, g, "triton")
