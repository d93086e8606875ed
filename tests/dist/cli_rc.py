"""``python tests/dist/cli_rc.py ARGS``: runs ``sere-scale ARGS`` in this process and appends "RANK EXIT_CODE" to
the file named by $RC_LOG, so that tests see each rank's exit code through launchers that hide it (torchrun).
A process that ends by ``os._exit`` (the hang watchdog) or a signal writes nothing. Guarded by ``__main__``:
forkserver/spawn loader workers import the main script (as ``__mp_main__``) when they start."""
import os
import sys

from sere_scale.cli import main

if __name__ == "__main__":
    rc = main(sys.argv[1:])
    with open(os.environ["RC_LOG"], "a") as f:
        f.write(f"{os.environ.get('RANK', '?')} {rc}\n")
    sys.exit(rc)
