"""``sere-scale export`` writes a Hub model card (README.md) into the timm folder: Hub metadata that
``huggingface_hub.ModelCard`` parses, the recipe and data size of the run, the evaluation figures the run folder
holds; ``--push-to-hub REPO --private`` creates the repository and uploads the folder (a stand-in for HfApi)."""
import json

import pytest
from huggingface_hub import ModelCard

from sere_scale.cli import main
from sere_scale.run.metrics import read_metrics
from tests.conftest import digits_subset
from tests.tiny import tiny_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digits_root):
    from sere_scale.run.train import train
    root = tmp_path_factory.mktemp("card")
    data = digits_subset(digits_root, root / "data16", 2, 8)  # 16 images
    run = root / "run"
    train(tiny_config(run, data, "train.max_steps=2", "data.batch_size=4", "eval.knn_every=2",
                      f"eval.knn_train_path={data}", f"eval.val_path={data}"))
    (run / "linear").mkdir()
    (run / "linear" / "linear.json").write_text(json.dumps(
        {"top1": 41.5, "top5": 90.25, "lr": 0.1, "holdout_top1": {"0.1": 40.0}, "n_train": 16, "n_val": 16}))
    (run / "linear" / "linear_random_init.json").write_text(json.dumps({"top1": 3.0}))
    (run / "seg").mkdir()  # sere-scale segprobe --out RUN/seg: fractions, per-class lists, a protocol
    (run / "seg" / "segprobe.json").write_text(json.dumps(
        {"mIoU": 0.125, "aAcc": 0.5, "IoU": [0.1, 0.15], "protocol": {"name": "nn"}, "seconds": {"fit": 1.0}}))
    return run


class FakeHfApi:
    """Records what would be sent: the repository created and the folder's files at upload time."""
    calls = []

    def create_repo(self, **kw):
        self.calls.append(("create_repo", kw))

    def upload_folder(self, **kw):
        from pathlib import Path
        files = {p.name: p.read_bytes() for p in Path(kw["folder_path"]).iterdir()}
        self.calls.append(("upload_folder", kw, files))
        return type("Info", (), {"commit_url": "https://huggingface.co/me/sere-test/commit/1"})()


def test_export_writes_a_hub_model_card_and_pushes_the_folder(run_dir, tmp_path, monkeypatch, capsys):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.calls.clear()
    out = tmp_path / "s_timm"
    assert main(["export", "--checkpoint", str(run_dir), str(out), "--push-to-hub", "me/sere-test", "--private"]) == 0
    card = ModelCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "timm" and meta["pipeline_tag"] == "image-feature-extraction"
    assert {"timm", "sere", "ibot", "self-supervised"} <= set(meta["tags"])
    rec = meta["sere_recipe"]
    assert rec["method"] == "ibot+sere" and rec["image_loss"] == "ibot" and rec["sere_alpha"] == 0.2
    assert rec["data_images"] == 16 and rec["global_batch"] == 4 and rec["steps_trained"] == 2
    assert rec["crops"] == "2x32px + 2x16px"
    knn = [r for r in read_metrics(run_dir) if "knn_top1" in r][-1]
    got = {(r.metric_name, r.metric_value) for r in card.data.eval_results}
    assert ("linear probe top1", 41.5) in got and ("linear probe top5", 90.25) in got
    assert ("k-NN (during training) knn_top1", knn["knn_top1"]) in got
    assert not any("lr" in n or "n_train" in n for n, _ in got) and 3.0 not in {v for _, v in got}
    assert "| dense | mIoU | 0.125 | seg/segprobe.json |" in card.text and "| dense | aAcc | 0.5 |" in card.text
    assert "seconds" not in card.text and "| dense | IoU" not in card.text
    assert "ibot+sere" in card.text and "timm.create_model('hf-hub:me/sere-test', pretrained=True)" in card.text
    assert "`vit_small_patch16_224` (num_classes=0, img_size=32, patch_size=8" in card.text
    # what would be sent: a private model repository, then the folder with the card, config and weights
    (c, create), (u, upload, files) = FakeHfApi.calls
    assert c == "create_repo" and create == {"repo_id": "me/sere-test", "repo_type": "model", "private": True,
                                             "exist_ok": True}
    assert u == "upload_folder" and upload["repo_id"] == "me/sere-test" and upload["folder_path"] == str(out)
    assert sorted(files) == ["README.md", "config.json", "model.safetensors"]
    assert files["README.md"] == (out / "README.md").read_bytes()
    assert "uploaded to https://huggingface.co/me/sere-test" in capsys.readouterr().out


def test_push_needs_a_folder_and_private_needs_push(run_dir, tmp_path):
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", str(run_dir), str(tmp_path / "t.safetensors"), "--push-to-hub", "me/x"])
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", str(run_dir), str(tmp_path / "d"), "--private"])
    assert not (tmp_path / "t.safetensors").exists() and not (tmp_path / "d").exists()
