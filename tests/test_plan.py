"""The model owns its parallelism plan: engines use ``parallel_plan()`` only (models/plan.py)."""
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from sere_scale.config.load import load_config
from sere_scale.engine.base import apply_ac_and_compile
from sere_scale.engine.params import last_layer_params, param_groups
from sere_scale.models.network import build_student_teacher
from sere_scale.models.plan import ParallelPlan
from tests.tiny import TINY

PKG = Path(__file__).resolve().parents[1] / "sere_scale"


@pytest.mark.parametrize("kind", ["ibot", "dino", "mocov3"])
def test_serenet_plan_lists_blocks_heads_and_the_early_frozen_layer(kind):
    cfg = load_config(None, [*TINY, "data.path=unused", f"image_loss.kind={kind}", "model.depth=3"])
    torch.manual_seed(0)
    net, _ = build_student_teacher(cfg)
    plan = net.parallel_plan()
    assert len(plan.blocks) == 3 and all(b is v for b, v in zip(plan.blocks, net.backbone.vit.blocks))
    assert plan.heads == (net.image_head, net.rel_global, net.rel_local)
    frozen = [n for n, _ in net.named_parameters() if plan.is_frozen_early(n)]
    if kind == "mocov3":
        assert frozen == []
    else:
        assert frozen and all(n.startswith("image_head.last_layer.") for n in frozen)
        assert {id(p) for p in last_layer_params(net)} == {id(p) for p in net.image_head.last_layer.parameters()}
    plan.set_activation_checkpointing(True)
    assert net.backbone.checkpoint_activations is True
    plan.set_activation_checkpointing(False)
    assert net.backbone.checkpoint_activations is False


class OtherNet(nn.Module):
    """A network laid out unlike SERENet (no backbone/image_head/rel_* attributes), exposing a plan."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
        self.out = nn.Linear(4, 3)
        self.frozen_proj = nn.Linear(3, 3, bias=False)
        self.ac = None

    def parallel_plan(self) -> ParallelPlan:
        return ParallelPlan(blocks=tuple(self.trunk), heads=(self.out, self.frozen_proj),
                            frozen_early=("frozen_proj",), set_activation_checkpointing=self._set_ac)

    def _set_ac(self, on):
        self.ac = on


def test_engine_helpers_work_on_any_network_with_a_plan(monkeypatch):
    net = OtherNet()
    compiled = []
    for blk in net.trunk:
        monkeypatch.setattr(blk, "compile", lambda blk=blk: compiled.append(blk))
    apply_ac_and_compile(net, True, True)
    assert net.ac is True and compiled == list(net.trunk)
    assert last_layer_params(net) == [net.frozen_proj.weight]
    groups = param_groups(net, split_last_layer=True)
    assert groups[-1]["last_layer"] and groups[-1]["params"] == [net.frozen_proj.weight]
    decayed = {id(p) for p in groups[0]["params"]}
    assert decayed == {id(m.weight) for m in (*net.trunk, net.out)}


def test_engines_do_not_name_model_attributes():
    """engine/ reaches the model through its plan only; models/ does not import the engines' modules by name."""
    for f in sorted((PKG / "engine").glob("*.py")):
        src = f.read_text()
        for name in ("backbone.vit", ".vit.blocks", "image_head", "rel_global", "rel_local"):
            assert name not in src, (f.name, name)
    for f in sorted((PKG / "models").glob("*.py")):
        assert not re.search(r"import_module\(|TEACHER_READERS", f.read_text()), f.name
