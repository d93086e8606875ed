"""Losses, one module each: image-level (DINO, iBOT patch) and SERE (spatial, channel)."""
from .dino import DINOLoss
from .ibot import IBOTPatchLoss
from .sere import ChannelRelationLoss, SpatialRelationLoss

__all__ = ["DINOLoss", "IBOTPatchLoss", "SpatialRelationLoss", "ChannelRelationLoss"]
