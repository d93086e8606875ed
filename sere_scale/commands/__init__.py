"""Sub-commands of ``sere-scale``, one module each (registered in ``sere_scale/cli.py``)."""
