"""Dense (patch-level) evaluation of pretrained backbones: tasks read from the backbone's patch tokens rather than
its image embedding, e.g. semi-supervised video object segmentation on DAVIS-2017 by label propagation
(``propagation``, ``vos``, scored by ``davis``).

Imports allowed here: torch, numpy, PIL and ``sere_scale.data`` / ``sere_scale.models`` / ``sere_scale.config``.
"""
