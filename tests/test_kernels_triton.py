"""Fused Triton relation CE vs the float64 reference.

On CPU the kernels run under TRITON_INTERPRET=1 in a subprocess (the variable must be set before triton decorates
the kernels, and must not leak into other tests); the parent builds the inputs and checks the outputs. With CUDA
the same cases also run natively.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.relation_reference import make_inputs, reference_grad, reference_loss

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"block_m": 16, "block_n": 16, "block_k": 16, "block_d": 16}
# name: (G, R, Ds, Dt, dtype, a, b, normalize, weights, blocks, loss_rtol, grad_rtol)
CASES = {
    "odd-sizes": (2, 37, 20, 11, torch.float32, 0.7, 1.3, False, None, SMALL, 1e-5, 1e-4),
    "r1": (1, 1, 5, 3, torch.float32, 0.9, 1.7, False, None, SMALL, 1e-5, 1e-4),
    "default-blocks": (2, 70, 9, 24, torch.float32, 0.5, 1.0, False, None, None, 1e-5, 1e-4),
    "unit-50": (2, 23, 3, 4, torch.float32, 50.0, 100.0, True, None, SMALL, 1e-4, 1e-3),
    "raw-60": (2, 23, 3, 4, torch.float32, 60.0, 60.0, False, None, SMALL, 1e-4, 1e-3),
    "weights": (4, 13, 9, 6, torch.float32, 1.1, 2.0, False, [0.5, 0.0, 2.0, 0.0], SMALL, 1e-5, 1e-4),
    "zero-weights": (3, 10, 4, 4, torch.float32, 1.0, 2.0, False, [0.0, 0.0, 0.0], SMALL, 0.0, 0.0),
    "fp16": (2, 21, 12, 8, torch.float16, 0.9, 1.5, False, None, SMALL, 1e-5, 3e-3),
    # bf16 operands are upcast in the interpreter; on GPU bf16 dS feeds the dX dot, hence the wider grad tol.
    "bf16": (2, 21, 12, 8, torch.bfloat16, 0.9, 1.5, False, None, SMALL, 1e-5, 2e-2),
}

RUNNER = r"""
import sys, torch
from sere_scale.kernels import relation_cross_entropy, tally_kernel_flops
from sere_scale.kernels.plain import weighted_mean
from sere_scale.kernels.triton_relation import TritonBlocks, relation_ce_rows_triton
cases, device = torch.load(sys.argv[1]), sys.argv[3]
out = {}
for name, (s, t, a, b, w, blocks) in cases.items():
    s = s.to(device).requires_grad_(True)
    t = t.to(device).requires_grad_(True)
    w = None if w is None else w.to(device)
    with tally_kernel_flops() as flops:
        if blocks is None:
            loss = relation_cross_entropy(s, t, a, b, weights=w, impl="triton")
        else:
            loss = weighted_mean(relation_ce_rows_triton(s, t, a, b, TritonBlocks(**blocks)), w)
        g_s, g_t = torch.autograd.grad(loss, [s, t], allow_unused=True)
    out[name] = (loss.detach().cpu(), g_s.cpu(), g_t is None or bool((g_t == 0).all()), flops[0])
torch.save(out, sys.argv[2])
"""


def _inputs():
    cases = {}
    for seed, (name, (G, R, Ds, Dt, dtype, a, b, norm, w, blocks, *_)) in enumerate(CASES.items()):
        s, t = make_inputs(G, R, Ds, Dt, dtype=dtype, seed=seed, normalize=norm)
        cases[name] = (s, t, a, b, None if w is None else torch.tensor(w), blocks)
    return cases


def _run(tmp_path, device):
    inputs = _inputs()
    torch.save(inputs, tmp_path / "in.pt")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path / "in.pt"), str(tmp_path / "out.pt"), device],
                          check=False, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return inputs, torch.load(tmp_path / "out.pt")


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=DEVICES)
def results(request, tmp_path_factory):
    return _run(tmp_path_factory.mktemp(f"triton-{request.param}"), request.param)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_reference(results, name):
    inputs, outputs = results
    s, t, a, b, w, _ = inputs[name]
    loss, g_s, teacher_grad_zero, _ = outputs[name]
    *_, loss_rtol, grad_rtol = CASES[name]
    assert teacher_grad_zero
    assert loss.dtype == torch.float32 and g_s.dtype == s.dtype and g_s.shape == s.shape
    assert torch.isfinite(loss) and torch.isfinite(g_s).all()
    if name == "zero-weights":
        assert loss.item() == 0.0 and torch.count_nonzero(g_s) == 0
        return
    ref, ref_g = reference_loss(s, t, a, b, w), reference_grad(s, t, a, b, w)
    torch.testing.assert_close(loss.double(), ref, rtol=loss_rtol, atol=loss_rtol * max(1.0, ref.abs().item()))
    torch.testing.assert_close(g_s.double(), ref_g, rtol=grad_rtol, atol=grad_rtol * ref_g.abs().max().item())


def test_triton_reports_its_flops(results):
    """FlopCounterMode cannot see the kernels: they add the plain implementation's model FLOPs to the tally."""
    _, outputs = results
    for name, (G, R, Ds, Dt, *_) in CASES.items():
        assert outputs[name][3] == 2 * G * R * R * (Ds + Dt) + 4 * G * R * R * Ds, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_picks_triton_on_cuda():
    from sere_scale.kernels import resolve_impl
    s, t = make_inputs(2, 5, 3, 3)
    assert resolve_impl(s.cuda(), t.cuda(), "auto") == "triton"


def test_unsupported_dtype_is_rejected():
    from sere_scale.kernels.triton_relation import relation_ce_rows_triton
    s, t = make_inputs(1, 2, 3, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="unsupported student dtype"):
        relation_ce_rows_triton(s, t.float(), 1.0, 1.0)


TF32_STATES = r"""
import torch
from sere_scale.kernels.triton_relation import cuda_matmul_allows_tf32 as allowed
out = [allowed()]
torch.backends.cuda.matmul.allow_tf32 = True  # the legacy flag
out.append(allowed())
torch.backends.cuda.matmul.allow_tf32 = False
out.append(allowed())
torch.backends.cuda.matmul.fp32_precision = "tf32"  # the new API: from here on the legacy getter raises
out.append(allowed())
torch.backends.cuda.matmul.fp32_precision = "ieee"
out.append(allowed())
torch.backends.fp32_precision = "tf32"  # inherited by matmul's "none"
torch.backends.cuda.matmul.fp32_precision = "none"
out.append(allowed())
print(out)
"""


def test_tf32_setting_is_read_through_either_api():
    """fp32 operands pick IEEE or TF32 products from torch's cuBLAS setting; a program that set the new
    ``fp32_precision`` API must not crash the kernel (reading the legacy ``allow_tf32`` then raises)."""
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("torch without the fp32_precision API")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", TF32_STATES], check=False, env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == "[False, True, False, True, False, True]"
