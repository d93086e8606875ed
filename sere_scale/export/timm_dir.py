"""Export a checkpoint's teacher (or student) backbone for timm: a ``timm-dir`` folder or one ``.safetensors``.

* ``timm-dir`` (default for a folder target): ``config.json`` + ``model.safetensors``, written by timm's own
  ``save_for_hf`` — the layout timm loads with ``timm.create_model('local-dir:OUT', pretrained=True)`` and the
  one it uploads to / loads from the Hugging Face Hub (``hf-hub:user/repo``). ``config.json`` holds the
  architecture, ``model_args`` and a ``pretrained_cfg`` carrying the run's true preprocessing (ImageNet
  mean/std, ``eval.eval_size``, crop_pct 1.0, bicubic, center crop: :func:`sere_scale.eval.features.
  eval_transform`), so ``timm.data.resolve_data_config`` rebuilds our eval transform.
* ``safetensors``: exactly the keys of ``timm.create_model(name, num_classes=0, **kwargs)`` (no classifier);
  :func:`create_model_call` writes the call that loads it strictly, with the same ``pretrained_cfg`` in
  ``pretrained_cfg_overlay`` (timm only relaxes strictness when ``num_classes`` differs from the pretrained
  config's, which is why the overlay sets it to 0 as well). The file's metadata also carries it.
"""
from __future__ import annotations

import json
from pathlib import Path

from sere_scale.data.multicrop import IMAGENET_MEAN, IMAGENET_STD
from sere_scale.models.backbone import timm_kwargs

PREFIX = "backbone.vit."
FORMATS = ("timm-dir", "safetensors")
WEIGHTS = ("teacher", "student")
EXPORT_FILES = {"config.json", "model.safetensors", "pytorch_model.bin", "README.md"}


def timm_state_dict(state: dict) -> dict:
    """The timm VisionTransformer's tensors out of a full SERENet (teacher or student) state dict:
    ``backbone.vit.*`` with the prefix removed; the iBOT mask token, the image-level and relation heads are
    left out (a ``mask_token`` key would also make timm's ViT loader treat the file as a DINOv2 checkpoint)."""
    out = {k[len(PREFIX):]: v.detach().cpu().contiguous().clone() for k, v in state.items()
           if k.startswith(PREFIX)}
    if not out:
        raise ValueError(f"no '{PREFIX}*' tensors in the state: not a sere_scale checkpoint?")
    return out


def timm_arch(cfg) -> tuple[str, dict]:
    """(timm model name, constructor kwargs) reproducing the trained backbone (classifier removed; any input
    size accepted, as in training: ``dynamic_img_size``)."""
    name, kw = timm_kwargs(cfg.model)
    return name, {"num_classes": 0, "img_size": cfg.data.global_size, **kw, "dynamic_img_size": True}


def pretrained_cfg(cfg, weights: str = "teacher") -> dict:
    """timm ``pretrained_cfg`` fields of the run's eval preprocessing (``eval_transform(eval.eval_size)``:
    bicubic resize of the short side to the size, center crop of that size, ImageNet mean/std)."""
    size = int(cfg.eval.eval_size or cfg.data.global_size)
    return {"input_size": (3, size, size), "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
            "mean": tuple(IMAGENET_MEAN), "std": tuple(IMAGENET_STD), "num_classes": 0,
            "tag": f"sere_{weights}"}


def create_model_call(name: str, kwargs: dict, file: str | Path, pcfg: dict | None = None) -> str:
    args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    extra = "".join(f", {k}={v!r}" for k, v in (pcfg or {}).items() if k not in ("num_classes", "tag"))
    return (f"timm.create_model({name!r}, pretrained=True{args}, "
            f"pretrained_cfg_overlay=dict(file={str(file)!r}, num_classes=0{extra}))")


def check_against_timm(state: dict, name: str, kwargs: dict) -> None:
    """Raise if ``state`` does not match the keys and shapes of a freshly built timm model."""
    import timm
    ref = timm.create_model(name, pretrained=False, **kwargs).state_dict()
    missing, unexpected = sorted(set(ref) - set(state)), sorted(set(state) - set(ref))
    shapes = [k for k in ref.keys() & state.keys() if tuple(ref[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"exported state does not fit timm '{name}' {kwargs}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, shape mismatch {shapes[:5]}")


def default_format(out: str | Path) -> str:
    return "safetensors" if str(out).endswith(".safetensors") else "timm-dir"


def export_timm(checkpoint: str | Path, out: str | Path, verify: bool = True, fmt: str | None = None,
                weights: str = "teacher", repo_id: str | None = None) -> dict:
    """Write the ``weights`` (teacher: EMA, default; or student) backbone of ``checkpoint`` (run or
    checkpoint folder, any backend) to ``out`` in ``fmt`` (default: by the target's name); a timm-dir also gets
    a model card, ``README.md`` (``export/model_card.py``; its loading call names ``hf-hub:repo_id`` if given).
    Returns ``{"file", "format", "arch", "kwargs", "pretrained_cfg", "step", "call"}``."""
    from sere_scale.models.load import load_run_config, read_checkpoint
    fmt = fmt or default_format(out)
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format '{fmt}': one of {list(FORMATS)}")
    if weights not in WEIGHTS:
        raise ValueError(f"unknown weights '{weights}': one of {list(WEIGHTS)}")
    full, ckpt_dir, run_dir = read_checkpoint(checkpoint, weights)  # the newest readable checkpoint
    cfg = load_run_config(run_dir)
    state = timm_state_dict(full)
    name, kwargs = timm_arch(cfg)
    pcfg = pretrained_cfg(cfg, weights)
    if verify:
        check_against_timm(state, name, kwargs)
    step = json.loads((ckpt_dir / "meta.json").read_text()).get("step")
    out = Path(out).resolve()
    res = {"format": fmt, "arch": name, "kwargs": kwargs, "pretrained_cfg": pcfg, "step": step,
           "weights": weights}
    if fmt == "timm-dir":
        _write_timm_dir(state, name, kwargs, pcfg, out)
        from sere_scale.export.model_card import build_card
        build_card(cfg, run_dir, {**res, "file": str(out)}, repo_id).save(out / "README.md")
        return {**res, "file": str(out), "call": f"timm.create_model({'local-dir:' + str(out)!r}, pretrained=True)"}
    from safetensors.torch import save_file
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "timm_arch": name, "timm_kwargs": json.dumps(kwargs), "source": str(ckpt_dir),
            "step": str(step), "weights": weights, "pretrained_cfg": json.dumps(pcfg)}
    tmp = out.with_name(out.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(out)
    return {**res, "file": str(out), "call": create_model_call(name, kwargs, out, pcfg)}


def _write_timm_dir(state: dict, name: str, kwargs: dict, pcfg: dict, out: Path) -> None:
    """timm's ``save_for_hf`` of the model holding ``state``, into ``out`` (replaced atomically)."""
    import shutil

    import timm
    from timm.models import save_for_hf
    overlay = {**pcfg, "license": None, "url": None, "hf_hub_id": None}
    model = timm.create_model(name, pretrained=False, pretrained_cfg_overlay=overlay, **kwargs)
    model.load_state_dict(state, strict=True)
    data = {k: pcfg[k] for k in ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_for_hf(model, str(tmp), model_args=kwargs, safe_serialization=True, data_config=data)
    if out.exists():
        if not out.is_dir() or set(p.name for p in out.iterdir()) - EXPORT_FILES:
            shutil.rmtree(tmp)
            raise FileExistsError(f"'{out}' exists and is not a timm-dir export: not replacing it")
        shutil.rmtree(out)
    tmp.replace(out)
