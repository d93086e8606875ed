"""ImageNet-style image trees → WebDataset tar shards (``sere-prep``): see docs/DATA.md."""
