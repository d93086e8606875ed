"""Data: image folders and WebDataset shards streamed to workers, decoding, multi-crop with box bookkeeping
(CPU ``MultiCrop`` / ``FastMultiCrop``, GPU ``GPUMultiCrop``, one ``AugmentRecipe``), iBOT block masks,
corrupt-sample replacement, the resumable sampler, loader workers, evaluation datasets and the embedded demo
data. Flat for now (24 modules); docs/ARCHITECTURE.md gives the stage split (augment / sources / loading) its
import graph allows.

Imports: ``config`` only (the patch size comes from ``config.arch``): never models, the method or engines
(import contract). Imported by: run, eval, viz, export, commands.
"""
