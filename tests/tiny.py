"""A tiny configuration for CPU tests: 2-block ViT, 32 px globals, 16 px locals, small heads."""
from sere_scale.config.load import load_config

TINY = [
    "model.arch=vit_tiny_cpu", "model.depth=2", "model.drop_path=0.1",
    "data.global_size=32", "data.local_size=16", "data.n_local=2", "data.batch_size=8", "data.num_workers=0",
    "image_loss.out_dim=64", "image_loss.hidden_dim=32", "image_loss.bottleneck_dim=16",
    "image_loss.warmup_teacher_temp_epochs=1",
    "sere.spatial_size_global=3", "sere.spatial_size_local=2",
    "optim.warmup_epochs=1", "optim.base_lr=1e-3", "train.epochs=2", "train.log_every=1", "train.progress=false",
    "checkpoint.every_steps=3", "eval.eval_size=32",
]


def tiny_config(output_dir, data_path, *extra):
    return load_config(None, [*TINY, f"output_dir={output_dir}", f"data.path={data_path}", *extra])


def tiny_overrides(output_dir, data_path, *extra):
    return [*TINY, f"output_dir={output_dir}", f"data.path={data_path}", *extra]
