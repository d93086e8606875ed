"""``sere-scale train``: the process around the Trainer (distributed set-up, preemption, watchdog, exit codes)."""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from sere_scale.run import nonfinite
from sere_scale.run.collapse import CollapseStop
from sere_scale.engine.checkpoint import CheckpointSaveError
from sere_scale.config.load import Config
from sere_scale.engine.distributed import DistInfo, cleanup, init_distributed
from sere_scale.run.trainer import REQUEUE_MARKER, Preemption, Trainer
from sere_scale.run.watchdog import HangWatchdog

log = logging.getLogger("sere_scale")

EXIT_NONFINITE = 3
EXIT_COLLAPSE = 4  # train.on_collapse=stop fired ('latest': the newest checkpoint from before the collapse window)
EXIT_SAVE_FAILED = 1  # a checkpoint could not be written (or held NaN/inf): the last good one is still `latest`
EXIT_REQUEUE = 124  # exit code after a preemption checkpoint (slurm/ templates requeue on it)
__all__ = ["EXIT_COLLAPSE", "EXIT_NONFINITE", "EXIT_REQUEUE", "EXIT_SAVE_FAILED", "REQUEUE_MARKER", "CollapseStop",
           "NonFiniteLoss", "main_train", "train"]


NonFiniteLoss = nonfinite.NonFiniteLoss


def train(cfg: Config, resume: bool = False, info: DistInfo | None = None, move_old: bool = False,
          preempt: Preemption | None = None, watchdog: HangWatchdog | None = None, **inject) -> dict:
    """Run training as configured (``Trainer``); returns a summary dict (step reached, last metrics, exit reason,
    the engine). ``inject``: ``loader``, ``method_cls``, ``engine_factory`` (see ``Trainer``)."""
    return Trainer(cfg, info, resume=resume, move_old=move_old, preempt=preempt, watchdog=watchdog,
                   **inject).run()


def main_train(cfg: Config, resume: bool, move_old: bool = False, **inject) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    info = init_distributed(timeout_s=cfg.train.dist_timeout_s)
    # now, before anything slow: a SIGTERM/SIGUSR1 from here on is kept (one during the rendezvous, with nothing
    # to save yet, still ends the process at once instead of leaving it blocked until the launcher's SIGKILL)
    preempt = Preemption()
    if not info.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)  # torchrun --max-restarts: > 0 after one
    if restart > 0 and not resume:
        log.warning("torchrun restarted the workers (TORCHELASTIC_RESTART_COUNT=%d): resuming from the newest "
                    "checkpoint", restart)
        resume = True
    watchdog = HangWatchdog(cfg.train.hang_timeout_s, cfg.output_dir, info.rank).start()
    try:
        result = train(cfg, resume=resume, info=info, move_old=move_old, preempt=preempt, watchdog=watchdog,
                       **inject)
    except NonFiniteLoss as e:
        if info.is_main:  # every rank raises the same error: one message
            log.error("%s", e)
        cleanup()
        return EXIT_NONFINITE
    except CollapseStop as e:
        log.error("%s", e)
        cleanup()
        return EXIT_COLLAPSE
    except CheckpointSaveError as e:
        if info.is_main:
            log.error("%s", e)
        cleanup()
        return EXIT_SAVE_FAILED
    finally:
        watchdog.stop()
    cleanup()
    if result["exit"] == "preempted":
        if info.is_main:
            (Path(cfg.output_dir) / REQUEUE_MARKER).write_text(f"{result['step']}\n")
        log.warning("preempted at step %d: checkpoint written, exiting with %d for requeue", result["step"],
                    EXIT_REQUEUE)
        return EXIT_REQUEUE
    if info.is_main and result["last"]:
        last = result["last"]
        log.info("finished at step %d, loss %.4f", result["step"], last.get("loss", math.nan))
    return 0
