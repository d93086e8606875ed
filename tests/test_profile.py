"""The throughput profiler on a tiny model: fields, FLOPs vs an analytic count, breakdown consistency."""
import json
import math

import pytest
import torch

from sere_scale.config.load import load_config
from sere_scale.models.network import build_student_teacher
from sere_scale.profiling.flops import count_flops
from sere_scale.profiling.report import write_profile
from sere_scale.run.profiler import run_profile
from tests.tiny import tiny_overrides


def vit_fwd(N, C, depth, patch, P):
    """Matmul FLOPs of one ViT forward on one image, written out: qkv, scores, A·V, proj, MLP, patch embed."""
    attn = 2 * N * C * 3 * C + 2 * N * N * C + 2 * N * N * C + 2 * N * C * C
    mlp = 2 * N * C * 4 * C * 2
    return depth * (attn + mlp) + 2 * P * C * 3 * patch * patch


def analytic_step(B, C, depth, heads, patch, gsize, lsize, ng, nl, Sg, Sl):
    """fwd + bwd FLOPs of one SERE step (image_loss.kind=none): student on all views, teacher on globals,
    relation heads and Gram matrices. Backward = 2× forward for linear layers, 1× for the patch embedding
    (pixels need no gradient), 2.5× for attention (torch's SDPA backward formula)."""
    def parts(size):
        P = (size // patch) ** 2
        N = P + 1
        attn_core = depth * 4 * N * N * C
        embed = 2 * P * C * 3 * patch * patch
        linear = vit_fwd(N, C, depth, patch, P) - attn_core - embed
        return P, N, attn_core, embed, linear
    total = 0
    for size, n in ((gsize, ng), (lsize, nl)):
        P, N, attn_core, embed, linear = parts(size)
        pred = 2 * 2 * P * C * C  # g_p and g_c: Linear(C, C) on every patch token
        total += n * B * (3 * (linear + pred) + 2 * embed + 3.5 * attn_core)  # student fwd + bwd
        if size == gsize:
            total += n * B * (linear + embed + attn_core)  # teacher fwd
    d = C // heads
    for q in range(ng):  # relation Grams: student fwd + 2 bwd products, teacher fwd
        for v in range(ng + nl):
            if v == q:
                continue
            S = Sg if v < ng else Sl
            R = S * S
            total += B * heads * 2 * R * R * d * 4
            Nq, Nv = (gsize // patch) ** 2, ((gsize if v < ng else lsize) // patch) ** 2
            total += B * (2 * C * C * Nv * 3 + 2 * C * C * Nq)
    return total


@pytest.fixture(scope="module")
def prof(tmp_path_factory, digits_root):
    out = tmp_path_factory.mktemp("prof")
    cfg = load_config(None, tiny_overrides(out, digits_root / "train", "image_loss.kind=none", "data.batch_size=4"))
    res = run_profile(cfg, steps=3, warmup=1, synthetic=False, trace=False, out_dir=str(out))
    write_profile(res, out)
    return cfg, res, out


def test_profile_outputs_have_every_field(prof):
    cfg, res, out = prof
    data = json.loads((out / "profile.json").read_text())
    for key in ("img_per_s", "mfu", "step_breakdown_s", "peak_memory_bytes", "flops_per_step", "loader_img_per_s",
                "model_img_per_s", "bottleneck", "data_wait_frac", "img_per_s_per_device"):
        assert key in data, key
    assert set(data["step_breakdown_s"]) == {"data_wait", "host_to_device", "teacher_forward", "student_forward",
                                              "losses", "backward", "optimizer", "ema"}
    assert data["img_per_s"] > 0 and 0 < data["mfu"] < 1 and data["peak_memory_bytes"] > 0
    assert (out / "profile.md").read_text().startswith("# Profile")
    for png in ("breakdown.png", "throughput.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_breakdown_sums_to_the_step_time(prof):
    _, res, _ = prof
    assert res["breakdown_sum_s"] == pytest.approx(res["timed_step_time_s"], rel=0.10)


def test_step_flops_match_the_analytic_count(prof):
    cfg, res, _ = prof
    d = cfg.data
    expected = analytic_step(d.batch_size, 64, 2, 4, 8, d.global_size, d.local_size, d.n_global, d.n_local,
                             cfg.sere.spatial_size_global, cfg.sere.spatial_size_local)
    assert res["flops_per_step"] == pytest.approx(expected, rel=0.05)


def test_backbone_forward_flops_match_vit_formula_at_vit_s_size():
    cfg = load_config(None, ["model.arch=vit_small_patch16_224", "data.n_local=0", "image_loss.kind=none"])
    student, _ = build_student_teacher(cfg)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        got = count_flops(lambda: student.backbone(x))
    assert got == pytest.approx(vit_fwd(197, 384, 12, 16, 196), rel=0.05)
    assert math.isclose(got / 1e9, 2 * 4.6, rel_tol=0.05)  # ViT-S/16 at 224 px: 4.6 GMACs (timm's figure)


def test_profile_with_device_augmentation(tmp_path, digits_root):
    cfg = load_config(None, tiny_overrides(tmp_path, digits_root / "train", "data.augment=gpu", "data.batch_size=4"))
    res = run_profile(cfg, steps=2, warmup=1, out_dir=str(tmp_path))
    assert res["loader_img_per_s"] > 0 and res["img_per_s"] > 0
    assert res["step_breakdown_s"]["host_to_device"] > 0


def test_profile_command_with_baseline(tmp_path, digits_root):
    import subprocess
    import sys

    from tests.conftest import subprocess_env
    r = subprocess.run([sys.executable, "-m", "sere_scale", "profile", "--synthetic", "--baseline", "--steps", "2",
                        "--warmup", "1", *tiny_overrides(tmp_path, digits_root / "train", "data.batch_size=4")],
                       capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "profile.json").read_text())
    # the full SERE step does strictly more work than the bare backbones
    assert res["baseline_img_per_s"] > 0 and res["speed_vs_baseline"] < 1.0
    assert "bare-backbone baseline" in (tmp_path / "profile.md").read_text()


def test_count_flops_adds_what_the_fused_kernels_report():
    from sere_scale.kernels import add_kernel_flops
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4
    assert count_flops(lambda: (a @ b, add_kernel_flops(1000))) == 2 * 8 * 16 * 4 + 1000
    add_kernel_flops(5)  # outside a count: ignored
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4
