"""Last-block CLS attention: agrees with timm's own (unfused) attention, finds an analytically forced patch,
and DINO's top-mass threshold keeps the fewest largest patches reaching the mass."""
import numpy as np
import pytest
import torch
from PIL import Image

from sere_scale.config.load import ModelConfig
from sere_scale.models.backbone import ViTBackbone, create_vit
from sere_scale.viz.attention import cls_attention, top_mass_mask
from sere_scale.viz.draw import PAD, TITLE_H
from sere_scale.viz.figures import attention_figure, attention_layout


def tiny_backbone(depth=2, seed=0):
    torch.manual_seed(seed)
    vit = create_vit(ModelConfig(arch="vit_tiny_cpu", depth=depth), 32, 0.0)
    with torch.no_grad():  # move away from the near-uniform attention of the init
        for p in vit.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return ViTBackbone(vit).eval()


def test_cls_attention_matches_timm_unfused_attention():
    bb = tiny_backbone()
    attn_mod = bb.vit.blocks[-1].attn
    attn_mod.fused_attn = False  # timm's reference path materialises the softmax before attn_drop
    seen = {}
    attn_mod.attn_drop.register_forward_hook(lambda m, i, o: seen.__setitem__("a", o.detach()))
    x = torch.randn(3, 3, 32, 32)
    ours, out = cls_attention(bb, x)
    ref = seen["a"][:, :, 0, 1:]  # CLS query row, patch keys
    assert ours.shape == (3, 4, 4, 4)
    torch.testing.assert_close(ours.flatten(2), ref, rtol=1e-5, atol=1e-6)
    assert float(ref.std()) > 1e-3  # not the trivially uniform map
    torch.testing.assert_close(out["pre"], bb(x)["pre"])


def forced_backbone(target: int, gamma: float = 50.0, marker: float = 100.0):
    """A 1-block tiny ViT whose CLS query matches only patch ``target``'s key, for any input image.

    Patch tokens carry a marker on channel 0 (position embedding ``marker`` at ``target``, 0 elsewhere; the
    patch embedding writes nothing to channel 0). After norm1 (LayerNorm) channel 0 is ≈ sqrt(C - 1) at the
    target and small elsewhere. Every head's key is channel 0 of the normed token (on its first dimension) and
    every head's query is the constant ``gamma`` (qkv bias): logit_j = scale·gamma·LN(x_j)[0]."""
    bb = tiny_backbone(depth=1, seed=1)
    vit = bb.vit
    C, H = vit.embed_dim, bb.num_heads
    hd = C // H
    with torch.no_grad():
        vit.patch_embed.proj.weight[0].zero_()
        vit.patch_embed.proj.bias[0] = 0.0
        vit.pos_embed[0, :, 0] = 0.0
        vit.pos_embed[0, 1 + target, 0] = marker
        blk = vit.blocks[0]
        blk.norm1.weight.fill_(1.0)
        blk.norm1.bias.zero_()
        W, b = blk.attn.qkv.weight, blk.attn.qkv.bias
        W[:2 * C].zero_()
        b[:2 * C].zero_()
        for h in range(H):
            b[h * hd] = gamma  # query of head h, first dimension
            W[C + h * hd, 0] = 1.0  # key of head h, first dimension = channel 0
    return bb


@pytest.mark.parametrize("target", [0, 6, 13])
def test_forced_attention_highlights_that_patch(target):
    bb = forced_backbone(target)
    x = torch.randn(2, 3, 32, 32)
    attn, _ = cls_attention(bb, x)
    flat = attn.flatten(2)
    assert (flat.argmax(-1) == target).all()
    assert (flat[..., target] > 0.99).all()
    keep = top_mass_mask(attn, 0.6).flatten(2)
    assert keep.sum(-1).eq(1).all() and keep[..., target].all()


def test_forced_attention_figure_lights_up_that_patch():
    target, panel = 6, 64  # grid 4×4: row 1, column 2
    bb = forced_backbone(target)
    img = Image.new("RGB", (32, 32), (128, 128, 128))
    fig, info = attention_figure(bb, img, 32, panel=panel)
    assert info["argmax"] == [target] * 4 and info["kept_patches"] == [1] * 4
    a = np.asarray(fig).astype(float).sum(-1)
    cell = panel // 4
    for col in range(2, 6):  # head panels
        x0, y0 = PAD + col * (panel + PAD), PAD + TITLE_H
        p = a[y0:y0 + panel, x0:x0 + panel]
        blocks = p.reshape(4, cell, 4, cell).mean(axis=(1, 3))
        r, c = divmod(target, 4)
        others = np.delete(blocks.ravel(), target)
        assert blocks[r, c] > 2 * others.max(), (col, blocks)


def brute_force_top_mass(a: np.ndarray, mass: float) -> np.ndarray:
    order = np.argsort(-a, kind="stable")
    total = a.sum()
    for k in range(1, len(a) + 1):
        if a[order[:k]].sum() >= mass * total:
            break
    keep = np.zeros(len(a), bool)
    keep[order[:k]] = True
    return keep


def test_top_mass_mask_matches_brute_force():
    small = torch.tensor([[0.5, 0.2], [0.3, 0.0]])
    assert top_mass_mask(small, 0.6).tolist() == [[True, False], [True, False]]
    g = torch.Generator().manual_seed(0)
    for mass in (0.3, 0.6, 0.9):
        maps = torch.rand(20, 5, 7, generator=g, dtype=torch.float64) ** 3
        keep = top_mass_mask(maps, mass)
        for m, k in zip(maps, keep):
            ref = brute_force_top_mass(m.flatten().numpy(), mass)
            assert (k.flatten().numpy() == ref).all()


def test_attention_layout_wraps_rows():
    assert attention_layout(4) == (1, 6)
    assert attention_layout(6) == (2, 7)  # 8 panels
    assert attention_layout(12) == (2, 7)
