"""plain / chunked relation cross-entropy and the dispatcher, against the float64 reference in relation_reference."""
import pytest
import torch

from sere_scale import kernels
from sere_scale.kernels import chunked, relation_cross_entropy, resolve_impl
from sere_scale.kernels.chunked import block_rows_for, relation_ce_rows_chunked
from tests.relation_reference import make_inputs, reference_grad, reference_loss, reference_rows

# "chunked-1row" forces one row per block, so every block boundary is exercised.
IMPLS = ["plain", "chunked", "chunked-1row"]
SHAPES = [  # G, R, Ds, Dt
    (1, 1, 5, 3),
    (3, 37, 20, 11),
    (2, 16, 7, 7),
]


@pytest.fixture(params=IMPLS)
def impl(request, monkeypatch):
    if request.param == "chunked-1row":
        monkeypatch.setattr(chunked, "DEFAULT_BLOCK_ELEMS", 1)
        return "chunked"
    return request.param


def loss_and_grad(impl, s, t, a, b, weights=None):
    s = s.detach().clone().requires_grad_(True)
    loss = relation_cross_entropy(s, t, a, b, weights=weights, impl=impl)
    (g,) = torch.autograd.grad(loss, s)
    return loss, g


def assert_matches(loss, grad, s, t, a, b, weights=None, rtol=1e-5, grad_rtol=1e-4):
    ref = reference_loss(s, t, a, b, weights)
    ref_g = reference_grad(s, t, a, b, weights)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == s.dtype and grad.shape == s.shape
    torch.testing.assert_close(loss.double(), ref, rtol=rtol, atol=rtol * max(1.0, ref.abs().item()))
    scale = ref_g.abs().max().item()
    torch.testing.assert_close(grad.double(), ref_g, rtol=grad_rtol, atol=grad_rtol * scale)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(impl, shape):
    s, t = make_inputs(*shape, seed=1)
    loss, g = loss_and_grad(impl, s, t, 0.7, 1.3)
    assert_matches(loss, g, s, t, 0.7, 1.3)


@pytest.mark.parametrize("normalize,a,b", [(True, 50.0, 100.0), (False, 60.0, 60.0)], ids=["unit-50", "raw-60"])
def test_large_logits_do_not_overflow(impl, normalize, a, b):
    # 3-d features: rows have close neighbours, so the softmaxes are not all one-hot on the diagonal and the
    # gradient is O(scale); raw-60 reaches logits of several hundred.
    s, t = make_inputs(2, 23, 3, 4, seed=2, normalize=normalize)
    loss, g = loss_and_grad(impl, s, t, a, b)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    assert_matches(loss, g, s, t, a, b, rtol=1e-4, grad_rtol=1e-3)


def test_weights_with_zeros(impl):
    s, t = make_inputs(4, 13, 9, 6, seed=3)
    w = torch.tensor([0.5, 0.0, 2.0, 0.0])
    loss, g = loss_and_grad(impl, s, t, 1.1, 2.0, w)
    assert_matches(loss, g, s, t, 1.1, 2.0, w)
    assert g[1].abs().max() == 0 and g[3].abs().max() == 0 and g[0].abs().max() > 0


def test_all_zero_weights_give_zero_connected_loss(impl):
    s, t = make_inputs(3, 10, 4, 4, seed=4)
    loss, g = loss_and_grad(impl, s, t, 1.0, 2.0, torch.zeros(3))
    assert loss.item() == 0.0
    assert torch.equal(g, torch.zeros_like(g))


def test_teacher_gets_no_gradient(impl):
    s, t = make_inputs(2, 11, 6, 5, seed=5)
    s.requires_grad_(True)
    t.requires_grad_(True)
    loss = relation_cross_entropy(s, t, 1.0, 3.0, impl=impl)
    g_s, g_t = torch.autograd.grad(loss, [s, t], allow_unused=True)
    assert g_t is None or torch.count_nonzero(g_t) == 0
    assert g_s.abs().max() > 0


@pytest.mark.parametrize("dtype,rtol,grad_rtol", [(torch.float16, 1e-5, 3e-3), (torch.bfloat16, 1e-5, 2e-2)],
                         ids=["fp16", "bf16"])
def test_half_inputs(impl, dtype, rtol, grad_rtol):
    s, t = make_inputs(2, 21, 12, 8, dtype=dtype, seed=6)
    loss, g = loss_and_grad(impl, s, t, 0.9, 1.5)
    # the reference sees the same rounded inputs, so only the fp32 compute and the rounding of dX remain
    assert_matches(loss, g, s, t, 0.9, 1.5, rtol=rtol, grad_rtol=grad_rtol)


def test_chunked_explicit_block_rows():
    s, t = make_inputs(3, 37, 10, 14, seed=7)
    for block in (1, 5, 36, 37, 100):
        torch.testing.assert_close(relation_ce_rows_chunked(s, t, 0.8, 1.2, block_rows=block).double(),
                                   reference_rows(s, t, 0.8, 1.2), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="block_rows"):
        relation_ce_rows_chunked(s, t, 0.8, 1.2, block_rows=0)


def test_block_rows_for_bounds_slab():
    assert block_rows_for(4, 100, 4 * 100 * 7) == 7
    assert block_rows_for(4, 100, 1) == 1
    assert block_rows_for(4, 100, 1 << 30) == 100
    G, R = 64, 1369
    assert G * block_rows_for(G, R) * R <= chunked.DEFAULT_BLOCK_ELEMS


def test_chunked_keeps_fp32_logits_under_autocast():
    s, t = make_inputs(2, 19, 24, 24, seed=8, normalize=True)
    s = s.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = relation_cross_entropy(s, t, 5.0, 10.0, impl="chunked")
    (g,) = torch.autograd.grad(loss, s)
    assert_matches(loss, g, s.detach(), t, 5.0, 10.0)


def _saved_numels(fn):
    sizes = []

    def pack(x):
        sizes.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return sizes


def test_chunked_saves_no_relation_matrix():
    G, R, D = 2, 64, 4
    s, t = make_inputs(G, R, D, D, seed=9)
    s.requires_grad_(True)
    plain = _saved_numels(lambda: relation_cross_entropy(s, t, 1.0, 2.0, impl="plain"))
    chunk = _saved_numels(lambda: relation_cross_entropy(s, t, 1.0, 2.0, impl="chunked"))
    assert max(plain) >= G * R * R  # the check can see an R×R activation ...
    assert max(chunk) <= G * R * D  # ... and chunked keeps only inputs and per-row statistics


def test_dispatch_rules(monkeypatch):
    s, t = make_inputs(2, 5, 3, 3)
    assert resolve_impl(s, t, "auto") == "chunked"
    for name in ("plain", "chunked", "triton"):
        assert resolve_impl(s, t, name) == name
    with pytest.raises(ValueError, match="unknown relation impl"):
        relation_cross_entropy(s, t, 1.0, 1.0, impl="fused")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="CUDA|not installed"):
        relation_cross_entropy(s, t, 1.0, 1.0, impl="triton")
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="not installed"):
        relation_cross_entropy(s, t, 1.0, 1.0, impl="triton")


def test_argument_validation():
    s, t = make_inputs(2, 5, 3, 4)
    with pytest.raises(ValueError, match=r"\(G, R, D\)"):
        relation_cross_entropy(s[0], t[0], 1.0, 1.0)
    with pytest.raises(ValueError, match="agree on"):
        relation_cross_entropy(s, t[:, :4], 1.0, 1.0)
    with pytest.raises(ValueError, match="weights"):
        relation_cross_entropy(s, t, 1.0, 1.0, weights=torch.ones(3))
