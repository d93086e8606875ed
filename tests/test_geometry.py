import torch

from sere_scale.geometry.boxes import overlap_boxes, region_aligned_sample


def coord_map(box, flip, h, w):
    """(2, h, w) feature map whose value at each cell is the ORIGINAL-image (x, y) of the cell centre."""
    x1, y1, x2, y2 = box
    u = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    v = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    if flip:
        u = 1 - u
    xs = x1 + u * (x2 - x1)
    ys = y1 + v * (y2 - y1)
    return torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)])


def test_overlap_boxes():
    a = torch.tensor([[0.1, 0.2, 0.6, 0.9], [0.0, 0.0, 0.3, 0.3], [0.0, 0.0, 0.5, 0.5]])
    b = torch.tensor([[0.4, 0.1, 0.8, 0.5], [0.5, 0.5, 1.0, 1.0], [0.5, 0.0, 1.0, 1.0]])
    boxes, valid = overlap_boxes(a, b)
    assert torch.allclose(boxes[0], torch.tensor([0.4, 0.2, 0.6, 0.5]))
    assert valid.tolist() == [True, False, False]  # touching edges have no area


def test_samples_are_original_coordinates_at_region_cell_centres():
    torch.manual_seed(0)
    S, h, w = 5, 14, 14
    views = [((0.1, 0.05, 0.8, 0.9), False), ((0.3, 0.2, 0.95, 0.85), True)]
    region = torch.tensor([[0.3, 0.2, 0.8, 0.85]])  # their overlap
    c = (torch.arange(S, dtype=torch.float64) + 0.5) / S
    exp_x = 0.3 + c * 0.5
    exp_y = 0.2 + c * 0.65
    outs = []
    for box, flip in views:
        f = coord_map(box, flip, h, w)[None]
        vb = torch.tensor([box], dtype=torch.float64)
        out = region_aligned_sample(f, vb, torch.tensor([flip]), region.double(), S)
        assert out.shape == (1, 2, S, S)
        # x varies left→right along columns, y top→bottom along rows, in the original orientation
        assert torch.allclose(out[0, 0], exp_x[None, :].expand(S, S), atol=1e-9)
        assert torch.allclose(out[0, 1], exp_y[:, None].expand(S, S), atol=1e-9)
        outs.append(out)
    assert torch.allclose(outs[0], outs[1], atol=1e-9)  # flipped and unflipped views agree element by element


def test_region_equal_to_view_returns_the_cells_themselves():
    f = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    box = torch.tensor([[0.2, 0.1, 0.7, 0.9]] * 2, dtype=torch.float64)
    flips = torch.tensor([False, True])
    out = region_aligned_sample(f, box, flips, box, 6)
    assert torch.allclose(out[0], f[0], atol=1e-12)
    assert torch.allclose(out[1], f[1].flip(-1), atol=1e-12)  # mirrored back to original orientation


def test_gradients_flow_through_sampling():
    f = torch.randn(1, 4, 7, 7, requires_grad=True)
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    out = region_aligned_sample(f, box, torch.tensor([False]), torch.tensor([[0.2, 0.2, 0.6, 0.6]]), 3)
    out.sum().backward()
    assert f.grad.abs().sum() > 0


def test_half_features_are_sampled_on_an_fp32_grid():
    """bf16/fp16 features: the grid and the interpolation stay fp32 (a bf16 grid misplaces cells by up to 2^-9 of
    the view); the result comes back in the features' dtype, or fp32 under autocast."""
    torch.manual_seed(0)
    f = torch.randn(2, 3, 14, 14)
    box = torch.tensor([[0.03, 0.11, 0.97, 0.93], [0.0, 0.0, 1.0, 1.0]])
    region = torch.tensor([[0.31, 0.27, 0.89, 0.91], [0.13, 0.52, 0.77, 0.99]])
    flips = torch.tensor([False, True])
    for dtype in (torch.bfloat16, torch.float16):
        h = f.to(dtype)
        ref = region_aligned_sample(h.float(), box, flips, region, 5)
        out = region_aligned_sample(h, box, flips, region, 5)
        assert out.dtype == dtype and torch.equal(out, ref.to(dtype))
        with torch.autocast("cpu", dtype=dtype):
            auto = region_aligned_sample(h, box, flips, region, 5)
        assert auto.dtype == torch.float32 and torch.equal(auto, ref)
