"""``sere-scale plan``: the memory, communication and throughput of a run at N GPUs, known before renting them.

Holds the GPU table and links (``hardware``), the collective counter and its time model (``comm``), the trace of
one real ``train_step`` for N simulated ranks in one CPU process under torch's fake process group and fake
tensors (``trace``), the tensors a rank holds and DeepSpeed's analytic model states (``model_states``), the
per-plan arithmetic (``estimate``) and the table/JSON/launch line (``report``). Method: docs/SCALING.md.

Imports: run (the step, start-up), engine, models, method, data, config. Imported by: commands only.
"""
