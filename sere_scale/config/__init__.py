"""Configuration: the schema (``schema.py``: typed dataclasses, every key with its default), loading and
validation (``load.py``: YAML files merged in order, ``key.sub=value`` overrides, errors naming the key),
merging and OmegaConf interpolation (``resolve.py``) and the ViT variants table (``arch.py``: timm name and
patch size of ``model.*`` without building anything).

Imports: nothing of sere_scale (the bottom layer). Imported by: every layer that reads a config (run, data,
engine, models, commands, cli).
"""
