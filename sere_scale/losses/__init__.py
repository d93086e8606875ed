"""Losses, one module each: DINO (``dino.py``), iBOT patch (``ibot.py``), MoCo v3 (``mocov3.py``) and
SERE's spatial and channel relation losses (``sere.py``), with the centered teacher (``centering.py``).

Imports: kernels, geometry. Imported by: method, eval.
"""
from sere_scale.losses.dino import DINOLoss
from sere_scale.losses.ibot import IBOTPatchLoss
from sere_scale.losses.sere import ChannelRelationLoss, SpatialRelationLoss

__all__ = ["DINOLoss", "IBOTPatchLoss", "SpatialRelationLoss", "ChannelRelationLoss"]
