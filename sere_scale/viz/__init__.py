"""Pictures of what a backbone learned: CLS attention (``attention.py``), PIL drawing helpers (``draw.py``),
the figures written by ``sere-scale visualize`` (``figures.py``, ``write.py``), drawing the self-relations of
``eval/relations.py``. See docs/VISUALIZE.md.

Imports: eval, models, data. Imported by: commands only.
"""
