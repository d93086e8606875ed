"""The published DINO/iBOT constructions, written here from their description: the prototype layer's default
nn.Linear initialisation and weight-norm forward, the CLS token's truncated-normal start, and the position grid
interpolated for 96-px local crops as DINO's ``interpolate_pos_encoding``."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import stats

from sere_scale.config.load import ModelConfig
from sere_scale.export.timm_dir import timm_state_dict
from sere_scale.models.backbone import ViTBackbone, create_vit, timm_kwargs
from sere_scale.models.heads import DINOHead

Z = 4.0


def test_prototype_layer_keeps_the_default_linear_init():
    torch.manual_seed(0)
    fan_in, K = 256, 4096
    w = DINOHead(384, K, 2048, fan_in, norm_last_layer=True).last_layer.weight_v.detach().double().flatten()
    bound = 1 / math.sqrt(fan_in)  # kaiming-uniform with a=√5: U(-1/√fan_in, 1/√fan_in)
    assert w.abs().max() <= bound
    std = 1 / math.sqrt(3 * fan_in)  # 0.0361
    # standard error of a sample std for a uniform law (kurtosis 9/5): std·√((9/5 - 1)/(4n))
    se = std * math.sqrt(0.8 / (4 * w.numel()))
    assert abs(w.std().item() - std) < Z * se, (w.std().item(), std)
    assert stats.kstest(w[:200_000].numpy(), "uniform", args=(-bound, 2 * bound)).pvalue > 1e-4
    rows = w.view(K, fan_in).norm(dim=1)
    assert abs(rows.mean().item() - math.sqrt(fan_in) * std) < 0.01  # ≈ 0.577 (std 0.02 gave 0.32)


def test_head_matches_the_published_construction_and_forward():
    """DINO's head: an MLP whose Linear weights get trunc_normal(0.02) and biases 0, then
    ``weight_norm(nn.Linear(bottleneck, K, bias=False))`` with g filled with 1 (fixed when norm_last_layer)."""
    in_dim, hidden, bottleneck, K = 24, 40, 16, 50
    for norm in (True, False):
        torch.manual_seed(3)
        ours = DINOHead(in_dim, K, hidden, bottleneck, norm_last_layer=norm)
        torch.manual_seed(3)
        mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                            nn.Linear(hidden, bottleneck))
        for m in mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        last = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, K, bias=False))
        with torch.no_grad():
            last.parametrizations.weight.original0.fill_(1.0)  # g
        torch.testing.assert_close(ours.last_layer.weight_v, last.parametrizations.weight.original1, rtol=0,
                                   atol=0)
        for a, b in zip(ours.mlp.parameters(), mlp.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        x = torch.randn(7, in_dim)
        ref = last(F.normalize(mlp(x), dim=-1, p=2))
        torch.testing.assert_close(ours(x), ref, rtol=1e-6, atol=1e-6)


def _vit_s_cfg(**kw):
    return ModelConfig(arch="vit_small_patch16_224", depth=1, drop_path=0.0, **kw)


def test_cls_token_starts_from_a_truncated_normal_of_std_002():
    torch.manual_seed(0)
    cls = torch.cat([create_vit(_vit_s_cfg(dino_vit=True), 224, 0.0).cls_token.detach().flatten()
                     for _ in range(3)]).double()
    se = 0.02 / math.sqrt(2 * cls.numel())
    assert abs(cls.std().item() - 0.02) < Z * se
    assert stats.kstest(cls.numpy(), "norm", args=(0, 0.02)).pvalue > 1e-4
    assert create_vit(_vit_s_cfg(), 224, 0.0).cls_token.abs().max() < 1e-4  # timm's own: std 1e-6


def _published_forward(vit, img, patch=16):
    """DINO's ViT forward_features with ``interpolate_pos_encoding`` written out: the patch grid of the
    model's N×N embedding interpolated with F.interpolate(scale_factor=((w0 + 0.1)/N, (h0 + 0.1)/N),
    mode='bicubic'), the class embedding kept apart; the grid as is when the sizes agree."""
    B, _, h, w = img.shape
    x = vit.patch_embed(img).reshape(B, -1, vit.embed_dim)
    pos = vit.pos_embed
    N = int(math.sqrt(pos.shape[1] - 1))
    w0, h0 = w // patch, h // patch
    if not (w0 == N and h0 == N):
        grid = pos[:, 1:].reshape(1, N, N, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((w0 + 0.1) / N, (h0 + 0.1) / N), mode="bicubic")
        assert grid.shape[-2:] == (w0, h0)
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, vit.embed_dim)], dim=1)
    x = torch.cat([vit.cls_token.expand(B, -1, -1), x], dim=1) + pos
    for blk in vit.blocks:
        x = blk(x)
    return vit.norm(x)


@pytest.mark.parametrize("size", [96, 224])
def test_local_crop_position_embedding_is_the_published_interpolation(size):
    torch.manual_seed(0)
    cfg = _vit_s_cfg(dino_vit=True)
    backbone = ViTBackbone(create_vit(cfg, 224, 0.0), dino_pos_embed=True).eval()
    img = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ours = backbone(img)
        ref = _published_forward(backbone.vit, img)
        timm_resampled = backbone.vit.forward_features(img)  # timm's antialiased resampling
    assert ours["grid"] == (size // 16, size // 16)
    torch.testing.assert_close(ours["cls"], ref[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["patch"], ref[:, 1:], rtol=1e-5, atol=1e-5)
    if size == 224:  # the global crops use the grid as is: timm's forward exactly
        assert torch.equal(ours["patch"], timm_resampled[:, 1:])
    else:  # the test tells the two resamplings apart
        assert (ours["patch"] - timm_resampled[:, 1:]).abs().max() > 1e-2


def test_export_reproduces_the_global_crop_features_in_timm():
    import timm
    torch.manual_seed(1)
    cfg = _vit_s_cfg(dino_vit=True)
    backbone = ViTBackbone(create_vit(cfg, 224, 0.0), dino_pos_embed=True).eval()
    state = timm_state_dict({f"backbone.{k}": v for k, v in backbone.state_dict().items()})
    name, kw = timm_kwargs(cfg)
    model = timm.create_model(name, num_classes=0, img_size=224, **kw).eval()
    model.load_state_dict(state, strict=True)
    img = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(img)[:, 0], backbone(img)["cls"], rtol=0, atol=0)


def test_network_option_reaches_the_backbone(tmp_path):
    from sere_scale.models.network import build_network
    from tests.tiny import tiny_config
    for flag in (False, True):
        net = build_network(tiny_config(tmp_path, tmp_path, f"model.dino_vit={str(flag).lower()}"))
        assert net.backbone.dino_pos_embed is flag
