"""Export a checkpoint's teacher backbone as a timm ViT state dict in a ``.safetensors`` file.

The file holds exactly the keys of ``timm.create_model(name, num_classes=0, **kwargs)`` (no classifier), so

    timm.create_model(name, pretrained=True, num_classes=0, **kwargs,
                      pretrained_cfg_overlay=dict(file=PATH, num_classes=0))

loads it strictly (timm only relaxes strictness when ``num_classes`` differs from the pretrained config's,
which is why the overlay sets it to 0 as well). ``name`` and ``kwargs`` are those the run was trained with
(``models.backbone.timm_kwargs`` plus ``img_size``); :func:`create_model_call` writes the exact call.
"""
from __future__ import annotations

import json
from pathlib import Path


from .models.backbone import timm_kwargs

PREFIX = "backbone.vit."


def timm_state_dict(teacher_state: dict) -> dict:
    """The timm VisionTransformer's tensors out of a full SERENet (teacher) state dict: ``backbone.vit.*``
    with the prefix removed; the iBOT mask token, the image-level and relation heads are left out (a
    ``mask_token`` key would also make timm's ViT loader treat the file as a DINOv2 checkpoint)."""
    out = {k[len(PREFIX):]: v.detach().cpu().contiguous().clone() for k, v in teacher_state.items()
           if k.startswith(PREFIX)}
    if not out:
        raise ValueError(f"no '{PREFIX}*' tensors in the teacher state: not a sere_scale teacher checkpoint?")
    return out


def timm_arch(cfg) -> tuple[str, dict]:
    """(timm model name, constructor kwargs) reproducing the trained backbone (classifier removed)."""
    name, kw = timm_kwargs(cfg.model)
    return name, {"num_classes": 0, "img_size": cfg.data.global_size, **kw}


def create_model_call(name: str, kwargs: dict, file: str | Path) -> str:
    args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return (f"timm.create_model({name!r}, pretrained=True{args}, "
            f"pretrained_cfg_overlay=dict(file={str(file)!r}, num_classes=0))")


def check_against_timm(state: dict, name: str, kwargs: dict) -> None:
    """Raise if ``state`` does not match the keys and shapes of a freshly built timm model."""
    import timm
    ref = timm.create_model(name, pretrained=False, **kwargs).state_dict()
    missing, unexpected = sorted(set(ref) - set(state)), sorted(set(state) - set(ref))
    shapes = [k for k in ref.keys() & state.keys() if tuple(ref[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"exported state does not fit timm '{name}' {kwargs}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, shape mismatch {shapes[:5]}")


def export_timm(checkpoint: str | Path, out: str | Path, verify: bool = True) -> dict:
    """Write the teacher backbone of ``checkpoint`` (run or checkpoint folder, any backend) to ``out``;
    returns ``{"file", "arch", "kwargs", "step", "call"}``."""
    from safetensors.torch import save_file

    from .models.load import load_run_config, read_teacher_state, resolve_checkpoint
    ckpt_dir, run_dir = resolve_checkpoint(checkpoint)
    cfg = load_run_config(run_dir)
    state = timm_state_dict(read_teacher_state(ckpt_dir))
    name, kwargs = timm_arch(cfg)
    if verify:
        check_against_timm(state, name, kwargs)
    step = json.loads((ckpt_dir / "meta.json").read_text()).get("step")
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "timm_arch": name, "timm_kwargs": json.dumps(kwargs), "source": str(ckpt_dir),
            "step": str(step)}
    tmp = out.with_name(out.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(out)
    return {"file": str(out), "arch": name, "kwargs": kwargs, "step": step,
            "call": create_model_call(name, kwargs, out)}
