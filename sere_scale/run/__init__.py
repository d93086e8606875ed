"""The training process: ``train.py`` (entry: exit codes, preemption, watchdog), ``trainer.py`` (the loop and its
hooks), ``step.py`` (the one definition of a training step), ``startup.py`` (model, method and engine set-up;
nothing written before the config and resume point are checked), ``rundir.py`` (run-folder ownership and
lock), ``resume.py`` (resume checks and fallback), ``nonfinite.py`` (the non-finite policy), ``collapse.py``
(the collapse alarm), ``watchdog.py``
(hang watchdog), ``banner.py`` (start-up record), ``metrics.py``, ``trackers.py``, ``trainlog.py`` (metrics
file, TensorBoard, W&B / MLflow / hooks, log window and live MFU) and ``profiler.py`` (``sere-scale
profile``'s step loop).

Imports: method, data, models, engine, eval, profiling, config. Imported by: commands (and the public API in
``sere_scale/__init__.py``).
"""
