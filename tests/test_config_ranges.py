"""Configuration values checked for sense (issue 23, item 5): each value outside its obvious domain is refused
with a message naming the key (exit code 2 from the CLI), and a section given as anything but a mapping is an
error alone and with overrides on it (the reproduction: ``model: [arch, depth]`` + ``model.depth=3`` silently
trained the default model)."""
import pytest

from sere_scale.cli import main
from sere_scale.config.load import ConfigError, load_config

# (override, key the message must name): domains from the definitions (a learning rate or temperature is
# positive, a weight decay non-negative, a probability or momentum in [0, 1], a size at least 1)
BAD = [
    ("optim.base_lr=-1", "optim.base_lr"), ("optim.base_lr=0", "optim.base_lr"),
    ("optim.min_lr=-1e-6", "optim.min_lr"), ("optim.min_lr=0.01", "optim.min_lr"),  # above base_lr 5e-4
    ("optim.weight_decay=-0.04", "optim.weight_decay"), ("optim.weight_decay_end=-1", "optim.weight_decay_end"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs"), ("optim.momentum_teacher=1.5", "optim.momentum_teacher"),
    ("optim.betas=[0.9,1.0]", "optim.betas"), ("optim.base_lr=.inf", "optim.base_lr"),
    ("optim.base_lr=.nan", "optim.base_lr"),
    ("image_loss.teacher_temp=0", "image_loss.teacher_temp"),
    ("image_loss.student_temp=-0.1", "image_loss.student_temp"),
    ("image_loss.moco_temp=0", "image_loss.moco_temp"), ("image_loss.center_momentum=2", "image_loss.center_momentum"),
    ("image_loss.out_dim=0", "image_loss.out_dim"), ("image_loss.mask_prob=1.2", "image_loss.mask_prob"),
    ("sere.tau_p=0", "sere.tau_p"), ("sere.tau_c=-1", "sere.tau_c"), ("sere.alpha=-0.2", "sere.alpha"),
    ("model.drop_path=1", "model.drop_path"), ("model.depth=0", "model.depth"),
    ("eval.knn_t=0", "eval.knn_t"), ("eval.knn_k=0", "eval.knn_k"), ("data.batch_size=0", "data.batch_size"),
    ("data.global_scale=[0.4,1.5]", "data.global_scale"),
]


@pytest.mark.parametrize("override, key", BAD)
def test_a_value_out_of_its_domain_names_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, [override])


def test_edges_of_the_domains_are_accepted():
    cfg = load_config(None, ["optim.min_lr=5e-4", "optim.weight_decay=0", "optim.momentum_teacher=1",
                             "image_loss.center_momentum=0", "model.drop_path=0", "sere.alpha=0"])
    assert cfg.optim.min_lr == cfg.optim.base_lr


def test_a_list_in_place_of_a_section_is_refused_with_or_without_overrides(tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text("model: [vit_tiny_cpu, 2]\n")
    for overrides in ([], ["model.depth=3"], ["model.depth=3", "model.arch=vit_tiny_cpu"], ["train.epochs=2"]):
        with pytest.raises(ConfigError, match=r"section 'model' in config file .*bad.yaml.* must be a mapping"):
            load_config(str(f), overrides)
    good = tmp_path / "good.yaml"
    good.write_text("model: {depth: 3}\n")
    for overrides in (["model=[a, b]"], ["model=3"]):
        with pytest.raises(ConfigError, match="section 'model' in override"):
            load_config(str(good), overrides)
    (tmp_path / "nested.yaml").write_text("log:\n  wandb: [x]\n")
    with pytest.raises(ConfigError, match="section 'log.wandb'"):
        load_config(str(tmp_path / "nested.yaml"), ["log.wandb.enabled=false"])
    assert load_config(str(good), ["model.depth=4"]).model.depth == 4  # a mapping merges with overrides
    # the CLI: exit code 2, the message names the section, nothing is written
    out = tmp_path / "run"
    assert main(["train", "--config", str(f), "model.depth=3", f"output_dir={out}"]) == 2
    assert "section 'model'" in capsys.readouterr().err and not out.exists()
    assert main(["train", "optim.base_lr=-1", f"output_dir={out}"]) == 2
    assert "'optim.base_lr'" in capsys.readouterr().err and not out.exists()
