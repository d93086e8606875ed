"""Pictures of what a backbone learned: CLS attention (attention.py), self-relations of two views
(relations.py), PIL drawing helpers (draw.py) and the figures written by ``sere-scale visualize``
(figures.py). See docs/VISUALIZE.md."""
