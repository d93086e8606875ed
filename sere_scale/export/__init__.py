"""Export of a run's teacher (or student) backbone to timm: a ``timm-dir`` folder (``config.json`` +
``model.safetensors``, loadable with ``local-dir:`` / ``hf-hub:``) or one ``.safetensors`` file
(``timm_dir.py``).

Imports: models, data (the evaluation preprocessing). Imported by: commands only.
"""
