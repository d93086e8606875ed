"""Measuring instruments for throughput: FLOP counting and device peaks (``flops.py``), region timers
(``timer.py``), the bare-backbone baseline (``baseline.py``) and the report writer (``report.py``). The
profiling run itself (a step loop like the Trainer's) is ``sere_scale.run.profiler``.

Imports: models, engine, kernels. Imported by: run (live MFU, the profiler), commands.
"""
