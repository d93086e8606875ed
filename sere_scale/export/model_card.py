"""The model card (``README.md``) of a timm-dir export, and its upload to the Hugging Face Hub.

The card is written with ``huggingface_hub``'s ``ModelCard`` / ``ModelCardData``: Hub metadata
(``library_name: timm``, ``pipeline_tag: image-feature-extraction``, tags naming the recipe, ``base_model`` when
the run started from a Hub model, a ``sere_recipe`` block, and a ``model-index`` of the evaluation figures) and a
body with the architecture, the pretraining recipe and data size from the run's config and start-up banner, the
evaluation figures the run folder holds and the call that loads the model. Evaluation figures found:

* during training: the last ``knn_top1`` / ``knn_top5`` (``eval.knn_every``) and ``dense_miou``
  (``eval.dense_every``) of ``metrics.jsonl``;
* ``knn*.json``, ``linear*.json``, ``segprobe*.json``, ``davis*.json``, ``dense*.json`` in the run folder or one
  folder below (``sere-scale linear`` writes ``RUN/linear/linear.json``, ``segprobe`` / ``davis`` their
  ``--out`` folder's): their numeric top-level figures, ``*random_init*`` files left out.
"""
from __future__ import annotations

import json
from pathlib import Path

from sere_scale.run.metrics import read_metrics

SKIP = {"k", "T", "t", "epochs", "lr", "step", "batch_size", "seed", "seconds"}  # settings, not figures (and n_*)
KINDS = {"knn": "k-NN", "linear": "linear probe", "segprobe": "dense", "davis": "dense", "dense": "dense"}
DURING = (("k-NN (during training)", ("knn_top1", "knn_top5")), ("dense (during training)", ("dense_miou",)))


def evaluations(run_dir: Path) -> list[dict]:
    """``{"name", "source", "figures": {metric: value}}`` for each evaluation the run folder holds."""
    out, records = [], read_metrics(run_dir)
    for name, keys in DURING:
        rows = [r for r in records if r.get(keys[0]) is not None]
        if rows:
            last = rows[-1]
            out.append({"name": name, "source": f"metrics.jsonl step {last['step']}",
                        "figures": {k: last[k] for k in keys if last.get(k) is not None}})
    files = sorted({*run_dir.glob("*.json"), *run_dir.glob("*/*.json")})
    for f in files:
        kind = next((k for k in KINDS if f.name.startswith(k)), None)
        if kind is None or "random_init" in f.name:
            continue
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        figs = {k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and k not in SKIP and not k.startswith("n_")} if isinstance(data, dict) else {}
        if figs:
            out.append({"name": KINDS[kind],
                        "source": str(f.relative_to(run_dir)), "figures": figs})
    return out


def _start_banner(run_dir: Path) -> dict:
    starts = [r for r in read_metrics(run_dir, events=True) if r.get("event") == "start"]
    return starts[-1] if starts else {}


def recipe(cfg, banner: dict, step) -> dict:
    """The pretraining recipe, from the run's config and its last start-up banner."""
    il, s, o = cfg.image_loss, cfg.sere, cfg.optim
    return {
        "method": f"{il.kind}+sere" if il.kind != "none" else "sere",
        "image_loss": il.kind, "sere_alpha": s.alpha, "sere_beta": s.beta, "sere_w_image": s.w_image,
        "epochs": cfg.train.epochs, "steps_trained": step, "global_batch": banner.get("global_batch"),
        "crops": f"{cfg.data.n_global}x{cfg.data.global_size}px + {cfg.data.n_local}x{cfg.data.local_size}px",
        "base_lr": o.base_lr, "weight_decay": [o.weight_decay, o.weight_decay_end],
        "teacher_momentum": o.momentum_teacher, "precision": banner.get("precision"),
        "data": banner.get("data") or cfg.data.shards or cfg.data.path, "data_images": banner.get("data_images"),
        **({"init_from": cfg.model.init_from} if getattr(cfg.model, "init_from", "") else {}),
    }


def build_card(cfg, run_dir: Path, res: dict, repo_id: str | None = None):
    """The ``huggingface_hub.ModelCard`` of an export result ``res`` (``export_timm``'s dict)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData
    banner = _start_banner(run_dir)
    rec = recipe(cfg, banner, res.get("step"))
    evals = evaluations(run_dir)
    name = repo_id or Path(res["file"]).name
    val = Path(str(cfg.eval.val_path).split("#")[0]).name or "validation set"
    results = [EvalResult(task_type="image-classification", dataset_type="imagefolder", dataset_name=val,
                          metric_type="accuracy", metric_value=v, metric_name=f"{e['name']} {k}")
               for e in evals if not e["name"].startswith("dense") for k, v in e["figures"].items()]
    init = getattr(cfg.model, "init_from", "")
    data = ModelCardData(
        library_name="timm", pipeline_tag="image-feature-extraction", model_name=name,
        tags=["image-feature-extraction", "timm", "self-supervised", "sere", il_tag(cfg), "sere_scale",
              f"sere_{res['weights']}"],
        base_model=init[len("hf-hub:"):] if init.startswith("hf-hub:") else None,
        eval_results=results or None, sere_recipe=rec)
    load = f"hf-hub:{repo_id}" if repo_id else f"local-dir:{res['file']}"
    kwargs = ", ".join(f"{k}={v!r}" for k, v in res["kwargs"].items())
    lines = [
        f"# {name}", "",
        f"A Vision Transformer backbone pretrained with SERE (self-relation) self-supervised learning "
        f"({rec['method']}), exported by sere_scale: the {'EMA teacher' if res['weights'] == 'teacher' else 'student'}"
        f" at step {res.get('step')}, in timm's layout, without classifier or pretraining heads.", "",
        "## Model", "", f"- architecture: `{res['arch']}` ({kwargs})",
        f"- preprocessing: {res['pretrained_cfg']['input_size'][1]} px, bicubic, center crop, ImageNet mean/std", "",
        "## Pretraining recipe", "", "| setting | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in rec.items()], "",
        "## Evaluation", "",
        *(["| evaluation | metric | value | source |", "|---|---|---|---|",
           *[f"| {e['name']} | {k} | {v} | {e['source']} |" for e in evals for k, v in e["figures"].items()]]
          if evals else ["No evaluation figures were found in the run folder."]), "",
        "## Use", "", "```python", "import timm",
        f"model = timm.create_model({load!r}, pretrained=True).eval()",
        "features = model.forward_features(x)[:, 0]  # CLS feature (k-NN, linear probe)", "```", "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(lines))


def il_tag(cfg) -> str:
    return {"ibot": "ibot", "dino": "dino", "mocov3": "moco-v3"}.get(cfg.image_loss.kind, "sere-only")


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, api=None) -> str:
    """Create ``repo_id`` (a model repository; ``private``) if needed and upload ``folder`` to it with
    ``huggingface_hub.HfApi``; returns the commit URL (or what the upload returned)."""
    from huggingface_hub import HfApi
    api = api if api is not None else HfApi()
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                             commit_message="sere_scale export (timm backbone + model card)")
    return str(getattr(info, "commit_url", info))
