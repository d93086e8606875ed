"""Throughput profiling: step breakdown, FLOPs and MFU, memory, traces, sweeps (``sere-scale profile``)."""
