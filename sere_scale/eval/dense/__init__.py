"""Dense (patch-level) evaluation of pretrained backbones: tasks read from the backbone's patch tokens rather than
its image embedding, e.g. semi-supervised video object segmentation on DAVIS-2017 by label propagation
(``propagation``, ``vos``, scored by ``davis``) and semantic-segmentation probes (``segprobe``: a linear head or
nearest-neighbour retrieval on the patch-token maps of ``features``, scored by ``metrics``, data sets found by
``layouts``).

Imports allowed here: torch, numpy, PIL and ``sere_scale.data`` / ``sere_scale.models`` / ``sere_scale.config``.
"""
