"""sere_scale: SERE self-supervised ViT pretraining at scale."""
__version__ = "0.1.0"
