"""``model.init_from``: a new run starts from exported, published-format or earlier run weights — the backbone
(heads random) from timm sources, the whole network from a run folder — in student and teacher alike; the
position grid is resampled when the image size differs; it is not a resume (step 0)."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from sere_scale.config.load import ConfigError
from sere_scale.export.timm_dir import export_timm
from sere_scale.models.load import load_teacher
from sere_scale.models.network import build_network
from sere_scale.run import startup
from sere_scale.run.metrics import read_metrics
from sere_scale.run.trainer import Trainer
from tests.conftest import digits_subset
from tests.tiny import tiny_config

VIT = "backbone.vit."


@pytest.fixture(scope="module")
def data16(tmp_path_factory, digits_root):
    return digits_subset(digits_root, tmp_path_factory.mktemp("data16"), 2, 8)


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, data16):
    """A 2-step run (iBOT+SERE, seed 7) and its timm-dir and single-file exports."""
    from sere_scale.run.train import train
    root = tmp_path_factory.mktemp("src")
    train(tiny_config(root / "run", data16, "train.max_steps=2", "data.batch_size=4", "train.seed=7"))
    export_timm(root / "run", root / "timm_dir")
    export_timm(root / "run", root / "teacher.safetensors")
    return root


def _trainer(tmp_path, data16, *extra):
    return Trainer(tiny_config(tmp_path / "new", data16, "train.max_steps=1", "data.batch_size=4", *extra))


def _nets(t):
    return t.engine.student_module.state_dict(), t.engine.teacher.state_dict()


def _random_init(cfg):
    student, _, _ = startup.build_model(cfg)  # the same seed without init_from: what stays random
    return student.state_dict()


def test_timm_dir_export_gives_the_runs_teacher_features_before_the_first_step(tmp_path, data16, source_run):
    t = _trainer(tmp_path, data16, f"model.init_from=local-dir:{source_run / 'timm_dir'}")
    student, teacher = _nets(t)
    net = build_network(t.cfg, teacher=True)
    net.load_state_dict(teacher)
    _, ref = load_teacher(source_run / "run")
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = net.eval().backbone(x), ref.backbone(x)
    assert torch.equal(got["cls"], want["cls"]) and torch.equal(got["patch"], want["patch"])
    random = _random_init(t.cfg)
    for k in student:  # student = teacher; backbone = the export's, heads and mask token = random init
        assert torch.equal(student[k], teacher[k]), k
        if k.startswith(VIT):
            assert torch.equal(student[k], ref.state_dict()[k]), k
        else:
            assert torch.equal(student[k], random[k]), k
    assert t.init_report["kept_random"] == ["backbone.mask_token", "image_head", "rel_global", "rel_local"]
    assert t.init_report["missing_backbone"] == [] and t.init_report["unexpected"] == []
    res = t.run()  # not a resume: steps, schedules, data from 0; the run folder records the source
    assert res["step"] == 1 and [r["step"] for r in read_metrics(t.cfg.output_dir)] == [1]
    start = read_metrics(t.cfg.output_dir, events=True)[0]
    assert start["event"] == "start" and start["step"] == 0 and start["resume"] is None
    assert start["init_from"]["source"] == f"local-dir:{source_run / 'timm_dir'}"
    assert read_metrics(t.cfg.output_dir)[0]["lr"] == read_metrics(source_run / "run")[0]["lr"]


@pytest.mark.parametrize("weights", ["teacher", "student"])
def test_run_folder_gives_the_whole_network_heads_included(tmp_path, data16, source_run, weights):
    ckpt = next((source_run / "run" / "checkpoints").glob("step_*"))
    want = torch.load(ckpt / "model.pt", map_location="cpu", weights_only=False)[weights]  # DDP's file itself
    spec = f"run:{source_run / 'run'}" + ("" if weights == "teacher" else "#student")
    t = _trainer(tmp_path, data16, f"model.init_from={spec}")
    student, teacher = _nets(t)
    assert student.keys() == want.keys()
    for k in want:
        assert torch.equal(student[k], want[k]) and torch.equal(teacher[k], want[k]), k
    assert t.init_report["kept_random"] == [] and t.init_report["step"] == 2
    assert t.init_report["weights"] == weights and t.init_report["checkpoint"] == str(ckpt.resolve())
    t.lock.release()


def _resampled(pos, old, new):
    """timm's resample_abs_pos_embed from its definition: the CLS embedding kept, the old×old grid resized
    bicubically (antialiased) to new×new."""
    cls, grid = pos[:, :1], pos[:, 1:]
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", antialias=True, align_corners=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)], dim=1)


def test_other_image_size_resamples_the_position_grid(tmp_path, data16, source_run):
    t = _trainer(tmp_path, data16, "data.global_size=48", f"model.init_from={source_run / 'teacher.safetensors'}")
    src = load_file(str(source_run / "teacher.safetensors"))
    student, teacher = _nets(t)
    torch.testing.assert_close(student[VIT + "pos_embed"], _resampled(src["pos_embed"], 4, 6), rtol=0, atol=1e-6)
    assert torch.equal(teacher[VIT + "pos_embed"], student[VIT + "pos_embed"])
    assert t.init_report["pos_embed_resampled"] == [[1, 17, 64], [1, 37, 64]]
    assert all(torch.equal(student[VIT + k], v) for k, v in src.items() if k != "pos_embed")
    t.lock.release()


def _fake_hf_cache(root, repo, files: dict):
    """A Hugging Face cache entry (refs/main → snapshot) holding ``files`` (name → path to copy)."""
    import shutil
    d = root / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (d / "refs").mkdir(parents=True)
    (d / "refs" / "main").write_text(commit)
    snap = d / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, src in files.items():
        shutil.copy(src, snap / name)


def test_timm_name_and_hf_hub_come_from_the_local_cache_only(tmp_path, data16, source_run, monkeypatch):
    import huggingface_hub.constants as hfc
    import timm
    cache = tmp_path / "hub"
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(cache))
    name = "vit_small_patch16_224.augreg_in21k_ft_in1k"  # timm's id: timm/<name>
    with pytest.raises(ConfigError, match=r"model.init_from.*not in the local cache.*create_model"):
        _trainer(tmp_path, data16, f"model.init_from=timm:{name}")
    # a published-size checkpoint (224 px, a 28×28 grid of 8-px patches) in the cache
    pub = timm.create_model("vit_small_patch16_224", num_classes=0, patch_size=8, embed_dim=64, depth=2,
                            num_heads=4).state_dict()
    save_file(pub, str(tmp_path / "model.safetensors"))
    _fake_hf_cache(cache, f"timm/{name}", {"model.safetensors": tmp_path / "model.safetensors"})
    t = _trainer(tmp_path, data16, f"model.init_from=timm:{name}")
    student, _ = _nets(t)
    torch.testing.assert_close(student[VIT + "pos_embed"], _resampled(pub["pos_embed"], 28, 4), rtol=0, atol=1e-6)
    assert all(torch.equal(student[VIT + k], v) for k, v in pub.items() if k != "pos_embed")
    assert t.init_report["resolved"].startswith(str(cache))
    t.lock.release()
    # hf-hub: a timm folder in the cache (the export); without it: an error saying how to fetch it
    with pytest.raises(ConfigError, match=r"not in the local Hugging Face cache.*hf download me/sere"):
        _trainer(tmp_path, data16, "model.init_from=hf-hub:me/sere")
    _fake_hf_cache(cache, "me/sere", {f: source_run / "timm_dir" / f for f in ("config.json", "model.safetensors")})
    t = _trainer(tmp_path, data16, "model.init_from=hf-hub:me/sere")
    exported = load_file(str(source_run / "timm_dir" / "model.safetensors"))
    assert all(torch.equal(_nets(t)[1][VIT + k], v) for k, v in exported.items())
    t.lock.release()


def test_missing_and_unexpected_keys_are_reported_and_bad_shapes_refused(tmp_path, data16, source_run):
    src = load_file(str(source_run / "teacher.safetensors"))
    part = {k: v for k, v in src.items() if k != "norm.weight"}
    part["extra.weight"] = torch.zeros(2)
    save_file(part, str(tmp_path / "part.safetensors"))
    t = _trainer(tmp_path, data16, f"model.init_from={tmp_path / 'part.safetensors'}")
    assert t.init_report["missing_backbone"] == [VIT + "norm.weight"]
    assert t.init_report["unexpected"] == [VIT + "extra.weight"]
    assert torch.equal(_nets(t)[0][VIT + "norm.weight"], torch.ones(64))  # LayerNorm's own init
    t.lock.release()
    bad = dict(src)
    bad["blocks.0.mlp.fc1.weight"] = torch.zeros(7, 64)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConfigError, match=r"model.init_from.*blocks.0.mlp.fc1.weight: \(7, 64\)"):
        _trainer(tmp_path / "b", data16, f"model.init_from={tmp_path / 'bad.safetensors'}")
    with pytest.raises(ConfigError, match=r"model.init_from.*cannot tell.*run:PATH"):
        _trainer(tmp_path / "c", data16, "model.init_from=somewhere")
    (tmp_path / "torn.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match=r"model.init_from.*cannot read the weights of .*torn.safetensors"):
        _trainer(tmp_path / "c", data16, f"model.init_from={tmp_path / 'torn.safetensors'}")
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    assert json.loads(json.dumps(t.init_report))  # recorded in metrics.jsonl as is
