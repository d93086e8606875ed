"""``model.init_from``: start training from published or earlier weights (continued / domain pretraining).

Sources (the config value):

* ``timm:NAME`` — a timm pretrained tag, e.g. ``timm:vit_small_patch16_224.dino``, read from the local cache only
  (the Hugging Face cache, or torch hub's for URL weights): never downloaded at run time; fetch it once with
  ``python -c "import timm; timm.create_model('NAME', pretrained=True)"``;
* ``hf-hub:USER/REPO`` — a timm model on the Hub, from the local Hugging Face cache only
  (``hf download USER/REPO`` fetches it); ``local-dir:PATH`` — a timm folder (``sere-scale export``'s timm-dir);
* ``PATH.safetensors`` / ``.pth`` / ``.bin`` — a timm ViT state dict (``sere-scale export``'s single file, the
  published DINO/iBOT ``.pth``: ``teacher``/``state_dict``/``model`` wrappers and ``module.``/``backbone.``
  prefixes are removed);
* ``run:PATH`` or ``run:PATH#student`` — a run folder, its ``checkpoints/`` or one checkpoint folder of any
  backend: its EMA teacher (default) or student network, heads and iBOT mask token included.

The weights go into student and teacher alike. From timm sources only the backbone is loaded: the image-level
and relation heads (and the mask token) keep their random initialisation; a run folder also gives the heads.
timm's ``checkpoint_filter_fn`` adapts the state to the model (formats, position-embedding resampling to the
model's grid with ``resample_abs_pos_embed``, patch-embedding resampling). A tensor whose shape still differs is
an error, as is a source of which no backbone tensor fits; missing and unexpected keys are reported (log, and the
``init_from`` field of the start-up banner in ``metrics.jsonl``). Not a resume: step, schedules and data
position start at 0.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from urllib.parse import urlparse

import torch

from sere_scale.config.load import ConfigError

log = logging.getLogger("sere_scale")
KEY = "model.init_from"
VIT = "backbone.vit."
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
FORMS = "timm:NAME, hf-hub:USER/REPO, local-dir:PATH, a .safetensors/.pth/.bin file, run:PATH[#teacher|#student]"


def _error(msg: str) -> ConfigError:
    return ConfigError(f"config key '{KEY}': {msg}")


def _cached_timm_file(name: str) -> str:
    """The local file of timm pretrained tag ``name`` (Hugging Face cache, else torch hub's), never downloaded."""
    from timm.models import get_pretrained_cfg
    pc = get_pretrained_cfg(name)
    if pc is None:
        raise _error(f"timm has no pretrained weights named '{name}' (see timm.list_pretrained())")
    if pc.hf_hub_id:
        from huggingface_hub import hf_hub_download
        names = [pc.hf_hub_filename] if pc.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for fname in names:
            try:
                return hf_hub_download(pc.hf_hub_id, fname, local_files_only=True)
            except Exception:  # noqa: BLE001 — LocalEntryNotFoundError and friends: not in the cache
                pass
    if pc.url:
        f = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(pc.url).path)
        if f.is_file():
            return str(f)
    raise _error(f"timm weights '{name}' are not in the local cache (no download at run time); fetch them once: "
                 f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\"")


def _timm_model_state(name: str, **kw) -> dict:
    import timm
    return timm.create_model(name, pretrained=True, num_classes=0, **kw).state_dict()


def _file_state(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        for wrapper in ("teacher", "state_dict", "model"):
            if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
                sd = sd[wrapper]
                break
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix) and not k.startswith(VIT):
                k = k[len(prefix):]
        out[k] = v
    return out


def source_state(spec: str, cfg) -> tuple[dict, bool, dict]:
    """(state, whole network?, where it came from) of an ``init_from`` value. A whole network's state has the
    SERENet keys; otherwise the keys are a timm ViT's."""
    from sere_scale.config.arch import timm_kwargs
    where: dict = {"source": spec}
    with torch.random.fork_rng(devices=[]):  # building a timm source model draws random numbers: keep the run's
        if spec.startswith("run:"):
            from sere_scale.models.load import read_state, resolve_checkpoint
            path, _, weights = spec[len("run:"):].partition("#")
            weights = weights or "teacher"
            if weights not in ("teacher", "student"):
                raise _error(f"'{spec}': after '#' comes teacher or student, not '{weights}'")
            try:
                ckpt_dir, _ = resolve_checkpoint(path)
            except FileNotFoundError as e:
                raise _error(str(e)) from None
            step = json.loads((ckpt_dir / "meta.json").read_text()).get("step")
            where.update(checkpoint=str(ckpt_dir.resolve()), weights=weights, step=step)
            return read_state(ckpt_dir, weights), True, where
        if spec.startswith("local-dir:"):
            if not (Path(spec[len("local-dir:"):]) / "config.json").is_file():
                raise _error(f"'{spec}': no config.json there (a timm folder: sere-scale export's timm-dir)")
            return _timm_model_state(spec), False, where
        if spec.startswith("hf-hub:"):
            from huggingface_hub import snapshot_download
            try:
                folder = snapshot_download(spec[len("hf-hub:"):], local_files_only=True)
            except Exception as e:  # noqa: BLE001
                raise _error(f"'{spec}' is not in the local Hugging Face cache (no download at run time; fetch it "
                             f"once with: hf download {spec[len('hf-hub:'):]}): {type(e).__name__}") from None
            where["resolved"] = folder
            return _timm_model_state(f"local-dir:{folder}"), False, where
        if spec.startswith("timm:"):
            name = spec[len("timm:"):]
            file = _cached_timm_file(name)
            where["resolved"] = file
            _, kw = timm_kwargs(cfg.model)  # the run's size overrides (none for a stock architecture)
            return _timm_model_state(name, pretrained_cfg_overlay=dict(file=file), **kw), False, where
        path = Path(spec)
        if path.suffix in WEIGHT_SUFFIXES:
            if not path.is_file():
                raise _error(f"weight file '{path}' does not exist")
            where["resolved"] = str(path.resolve())
            return _file_state(path), False, where
    raise _error(f"cannot tell what '{spec}' is: one of {FORMS}")


def _grid(state: dict, key: str) -> list | None:
    return list(state[key].shape) if key in state else None


def init_from(spec: str, cfg, student: torch.nn.Module, teacher: torch.nn.Module) -> dict:
    """Load ``spec``'s weights into ``student`` and ``teacher`` (same values); returns the report."""
    from timm.models.vision_transformer import checkpoint_filter_fn
    try:
        state, whole, where = source_state(spec, cfg)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 — timm, torch, safetensors (SafetensorError) could not read it
        raise _error(f"cannot read the weights of '{spec}': {type(e).__name__}: {e}") from e
    vit_state = {k[len(VIT):]: v for k, v in state.items() if k.startswith(VIT)} if whole else state
    before = _grid(vit_state, "pos_embed")
    vit_state = checkpoint_filter_fn(vit_state, student.backbone.vit)  # formats, position grid, patch size
    after = _grid(vit_state, "pos_embed")
    new = {VIT + k: v for k, v in vit_state.items()}
    if whole:
        new.update({k: v for k, v in state.items() if not k.startswith(VIT)})
    target = student.state_dict()
    wrong = [f"{k}: {tuple(v.shape)} in the source, {tuple(target[k].shape)} in the model"
             for k, v in new.items() if k in target and tuple(v.shape) != tuple(target[k].shape)]
    if wrong:
        raise _error(f"'{spec}' does not fit model.arch '{cfg.model.arch}': " + "; ".join(wrong[:6]))
    loaded = sorted(k for k in new if k in target)
    if not any(k.startswith(VIT) for k in loaded):
        raise _error(f"no backbone tensor of '{spec}' fits the model (keys like {sorted(new)[:4]})")
    missing = sorted(set(target) - set(new))
    report = {**where, "loaded": len(loaded),
              "missing_backbone": [k for k in missing if k.startswith(VIT)],
              "kept_random": sorted({k.split(".")[0] if not k.startswith("backbone.") else k
                                     for k in missing if not k.startswith(VIT)}),
              "unexpected": sorted(set(new) - set(target))}
    if before != after:
        report["pos_embed_resampled"] = [before, after]
    student.load_state_dict({**target, **{k: new[k].to(target[k].dtype) for k in loaded}})
    teacher.load_state_dict(student.state_dict())
    log.info("model.init_from %s: %d tensors loaded into student and teacher%s; kept at random init: %s",
             spec, len(loaded), f"; position embedding resampled {before} -> {after}" if before != after else "",
             ", ".join(report["kept_random"]) or "nothing")
    if report["missing_backbone"] or report["unexpected"]:
        log.warning("model.init_from %s: backbone tensors missing from the source (random init): %s; source tensors "
                    "not in the model (ignored): %s", spec, report["missing_backbone"] or "none",
                    report["unexpected"] or "none")
    return report
