"""Evaluation of pretrained backbones: k-NN (and linear probe)."""
