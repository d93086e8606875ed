"""Pictures of what a backbone learned: CLS attention (attention.py), PIL drawing helpers (draw.py) and the
figures written by ``sere-scale visualize`` (figures.py), drawing the self-relations of ``eval/relations.py``.
See docs/VISUALIZE.md."""
