"""Data: multi-crop with box bookkeeping, iBOT masks, folder and shard loaders."""
