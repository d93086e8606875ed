"""Box bookkeeping, the contract data and the spatial loss share (docs/METHOD.md): overlap regions of two
views and region-aligned sampling of feature maps (``boxes.py``).

Imports: nothing of sere_scale (bottom layer, torch only). Imported by: losses, eval.
"""
