"""``python tests/dist/cli_rc.py ARGS``: runs ``sere-scale ARGS`` in this process and appends "RANK EXIT_CODE" to
the file named by $RC_LOG, so that tests see each rank's exit code through launchers that hide it (torchrun).
A process that ends by ``os._exit`` (the hang watchdog) or a signal writes nothing."""
import os
import sys

from sere_scale.cli import main

rc = main(sys.argv[1:])
with open(os.environ["RC_LOG"], "a") as f:
    f.write(f"{os.environ.get('RANK', '?')} {rc}\n")
sys.exit(rc)
