"""The method: ``SEREMethod`` (``sere_method.py``: student, teacher and a batch → dict of losses; knows
nothing of the backend) and its per-step schedules (``schedules.py``: lr, weight decay, teacher momentum and
temperature).

Imports: losses: never an engine (import contract). Imported by: run.
"""
