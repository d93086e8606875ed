"""Patch-token maps (eval/dense/features.py) against timm's own forward and a manual forward written here."""
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from sere_scale.eval.dense.features import patch_features
from sere_scale.models.backbone import ViTBackbone


def tiny_vit(dynamic=True, **kw):
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=3, num_heads=2, num_classes=0, dynamic_img_size=dynamic, **kw).eval()


def manual_tokens(vit, x, grid):
    """Every block's output (prefix tokens included) of a padded image: conv patch embedding, position embedding
    resampled with timm's resample_abs_pos_embed, prefix tokens, blocks."""
    t = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
    n_prefix = vit.num_prefix_tokens
    pos = resample_abs_pos_embed(vit.pos_embed, new_size=grid, old_size=(4, 4),
                                 num_prefix_tokens=0 if vit.no_embed_class else n_prefix)
    prefix = [p.expand(x.shape[0], -1, -1) for p in (vit.cls_token, vit.reg_token) if p is not None]
    t = torch.cat(prefix + [t + pos], 1) if vit.no_embed_class else torch.cat(prefix + [t], 1) + pos
    outs = []
    for blk in vit.blocks:
        t = blk(t)
        outs.append(t)
    return outs


def to_map(tokens, vit, grid):
    t = vit.norm(tokens)[:, vit.num_prefix_tokens:]
    return t.reshape(t.shape[0], *grid, -1).permute(0, 3, 1, 2)


@torch.no_grad()
@pytest.mark.parametrize("dynamic", [True, False])
def test_native_size_equals_forward_features(dynamic):
    vit = tiny_vit(dynamic)
    x = torch.randn(2, 3, 32, 32)
    want = vit.forward_features(x)[:, 1:].reshape(2, 4, 4, -1).permute(0, 3, 1, 2)  # before any switch
    got = patch_features(vit, x)
    assert got.shape == (2, 32, 4, 4)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(vit.forward_features(x)[:, 1:].reshape(2, 4, 4, -1).permute(0, 3, 1, 2), want,
                               rtol=0, atol=1e-6)  # switching to dynamic size left the native forward alone


@torch.no_grad()
def test_project_backbone_equals_its_patch_tokens():
    bb = ViTBackbone(tiny_vit()).eval()
    x = torch.randn(1, 3, 32, 32)
    want = bb(x)["patch"].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(patch_features(bb, x), want, rtol=0, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("kw", [{}, {"reg_tokens": 2, "no_embed_class": True}])
def test_padded_and_interpolated(kw):
    vit = tiny_vit(**kw)
    x = torch.randn(2, 3, 37, 45)  # padded to 40 x 48: a 5 x 6 grid
    xp = F.pad(x, (0, 3, 0, 3))
    want = to_map(manual_tokens(vit, xp, (5, 6))[-1], vit, (5, 6))
    got = patch_features(vit, x)
    assert got.shape == (2, 32, 5, 6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, to_map(manual_tokens(vit, F.pad(x, (0, 3, 0, 3), value=1.0), (5, 6))[-1],
                                          vit, (5, 6)))  # the padding value matters: zeros it is


@torch.no_grad()
def test_last_layers_concatenated_earliest_first():
    vit = tiny_vit()
    x = torch.randn(1, 3, 24, 40)
    outs = manual_tokens(vit, x, (3, 5))
    want = torch.cat([to_map(t, vit, (3, 5)) for t in outs[-2:]], 1)
    got = patch_features(vit, x, layers=2)
    assert got.shape == (1, 64, 3, 5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    fi = vit.forward_intermediates(x, indices=2, norm=True, intermediates_only=True)
    torch.testing.assert_close(got, torch.cat(fi, 1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="3 blocks"):
        patch_features(vit, x, layers=4)
