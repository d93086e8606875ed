"""Models: the timm ViT backbone wrapper (``backbone.py``), projection/prediction and image-level heads
(``heads.py``, ``mocov3_heads.py``), the student/teacher network (``network.py``) and its parallel plan
(``plan.py``), and loading trained weights from run folders, exports and timm files (``load.py``,
``source.py``).

Imports: config, engine (checkpoint readers, the differentiable all-reduce of synchronised BatchNorm): never
data. Imported by: run, eval, viz, export, profiling, commands.
"""
