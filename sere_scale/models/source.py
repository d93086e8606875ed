"""A backbone to inspect, from a training checkpoint (any backend) or from an exported timm file.

``load_eval_backbone(checkpoint=..., timm_file=..., arch=...)`` → ``(cfg, ViTBackbone)`` in eval mode on CPU (the
evaluation commands); ``load_backbone(source, weights)`` → the timm ``VisionTransformer`` alone (the public API).
For a timm file there is no run config: ``cfg`` is the default :class:`Config` with ``model.arch`` set and
``data.global_size`` set to the image size the file's position embedding was trained at, so callers read image
size, relation heads and temperatures from ``cfg`` whatever the source.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional

import timm
import torch

from sere_scale.config.load import Config
from sere_scale.models.backbone import VARIANTS, ViTBackbone, timm_kwargs


def _shapes_from_file(path: Path) -> dict:
    """Depth, width, patch size and image size recorded in a timm ViT state dict (.safetensors or torch)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
    out = {}
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    if blocks:
        out["depth"] = max(blocks) + 1
    if "patch_embed.proj.weight" in shapes:
        C, _, p, _ = shapes["patch_embed.proj.weight"]
        out["embed_dim"], out["patch_size"] = int(C), int(p)
        if "pos_embed" in shapes:
            n_prefix = 0 if "cls_token" not in shapes else 1
            n_prefix += shapes["reg_token"][1] if "reg_token" in shapes else 0
            n = shapes["pos_embed"][1]
            for cand in (n - n_prefix, n):  # class token with or without a position embedding
                g = int(round(math.sqrt(cand)))
                if g * g == cand:
                    out["img_size"] = g * int(p)
                    break
    return out


def load_timm_file(file: str | Path, arch: str) -> tuple[Config, ViTBackbone]:
    """Build timm model ``arch`` (a timm ViT name or a sere_scale variant such as ``vit_tiny_cpu``) with
    weights from ``file`` via ``timm.create_model(..., pretrained_cfg_overlay=dict(file=...))``; depth,
    width, patch and image size are read from the file so a resized variant loads without further flags."""
    path = Path(file)
    if not path.exists():
        raise FileNotFoundError(f"timm file '{path}' does not exist")
    cfg = Config()
    cfg.model.arch = arch
    name, kw = timm_kwargs(cfg.model)
    shapes = _shapes_from_file(path)
    img_size = shapes.pop("img_size", None)
    kw.update(shapes)
    for key in ("patch_size", "embed_dim", "depth"):
        setattr(cfg.model, key, kw.get(key))
    if img_size is not None:
        kw["img_size"] = img_size
    vit = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=0,
                            dynamic_img_size=True, **kw)
    size = img_size or vit.patch_embed.img_size[0]
    cfg.data.global_size = cfg.eval.eval_size = int(size)
    return cfg, ViTBackbone(vit).eval()


def load_eval_backbone(checkpoint: Optional[str] = None, timm_file: Optional[str] = None,
                  arch: Optional[str] = None, random_init: bool = False) -> tuple[Config, ViTBackbone]:
    """The backbone of a run / checkpoint folder (its teacher, any backend) or of a timm file.

    A ``checkpoint`` path ending in ``.safetensors`` (or ``.pth``/``.bin``) is treated as a timm file and then
    needs ``arch``."""
    weight_suffixes = (".safetensors", ".pth", ".bin")
    if checkpoint and Path(checkpoint).suffix in weight_suffixes and Path(checkpoint).is_file():
        if timm_file:
            raise ValueError("give either a checkpoint or a timm file, not both")
        timm_file, checkpoint = checkpoint, None
    if timm_file:
        if not arch:
            raise ValueError(f"'{timm_file}' is a timm weight file: name its architecture with --arch "
                             f"(a timm ViT name, or one of {sorted(VARIANTS)})")
        if random_init:
            raise ValueError("--random-init needs a training checkpoint (its config builds the model)")
        return load_timm_file(timm_file, arch)
    if not checkpoint:
        raise ValueError("give --checkpoint (run or checkpoint folder, or a .safetensors file with --arch)")
    from sere_scale.models.load import load_teacher
    cfg, net = load_teacher(checkpoint, random_init=random_init)
    return cfg, net.backbone.eval()


def load_backbone(source: str | Path, weights: str = "teacher", arch: str | None = None) -> torch.nn.Module:
    """The timm ``VisionTransformer`` of ``source``, in eval mode on CPU, ready for features
    (``forward_features``, ``forward_intermediates``; no classifier):

    * a run folder, its ``checkpoints/`` folder or one checkpoint folder (any backend): the ``weights``
      network's backbone (``"teacher"``, the EMA teacher, by default; or ``"student"``);
    * an exported timm folder (``config.json`` + ``model.safetensors``, ``sere-scale export``);
    * a ``.safetensors`` / ``.pth`` / ``.bin`` weight file, with ``arch`` (a timm ViT name or a variant such as
      ``vit_tiny_cpu``);
    * a timm model name with a weight source: ``"hf-hub:user/repo"`` or ``"local-dir:PATH"``.
    """
    text = str(source)
    if text.startswith(("hf-hub:", "local-dir:")):
        return timm.create_model(text, pretrained=True, num_classes=0).eval()
    p = Path(source)
    if p.is_file():
        if not arch:
            raise ValueError(f"'{p}' is a weight file: name its architecture with arch= (a timm ViT name)")
        return load_timm_file(p, arch)[1].vit.eval()
    if (p / "config.json").is_file() and not (p / "meta.json").exists() and not (p / "checkpoints").exists():
        return timm.create_model(f"local-dir:{p.resolve()}", pretrained=True, num_classes=0).eval()
    from sere_scale.models.load import build_network, load_run_config, read_checkpoint
    state, _, run_dir = read_checkpoint(p, weights)
    cfg = load_run_config(run_dir)
    net = build_network(cfg, teacher=True)  # drop-path 0: the features of eval mode
    net.load_state_dict(state)
    return net.backbone.vit.eval()


def add_source_args(p) -> None:
    """The command-line options that name a backbone (``sere-scale visualize``, ``sere-scale invariance``)."""
    p.add_argument("--checkpoint", help="run folder, checkpoint folder (any backend), or a timm .safetensors "
                                        "file (then with --arch)")
    p.add_argument("--timm-file", help="exported timm backbone weights (.safetensors); needs --arch")
    p.add_argument("--arch", "--timm-arch", dest="arch",
                   help=f"timm architecture of a timm file (a timm ViT name or one of {sorted(VARIANTS)})")
    p.add_argument("--random-init", action="store_true",
                   help="the checkpoint's architecture at its random initialisation (a baseline)")
