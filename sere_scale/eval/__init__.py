"""Evaluation of pretrained backbones: features of labelled image sets (``features.py``), k-NN and linear
probes (``knn.py``, ``linear.py``), the self-relation invariance of two views (``relations.py``,
``invariance.py``, ``views.py``).

Imports: data, models, losses, geometry: never viz (pictures import evaluation, not the reverse). Imported by:
run (evaluation hooks during training), viz, commands.
"""
