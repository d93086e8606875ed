"""The Trainer: built from the config (loader, method and engine injectable), runs ``fit``: ``train_step``
(``step.py``, the one definition of a step), then the run's hooks: the ``train.nonfinite`` policy, maybe log
(and evaluate, and judge collapse: ``collapse.py``), maybe checkpoint. Never branches on the backend."""
from __future__ import annotations

import contextlib
import functools
import logging
import signal
import sys
from pathlib import Path

import torch

from sere_scale.run import nonfinite, startup
from sere_scale.run.banner import log_banner, start_banner
from sere_scale.run.collapse import CollapseAlarm
from sere_scale.config.load import Config, ConfigError
from sere_scale.data.loader import build_train_loader
from sere_scale.engine.distributed import DistInfo, all_reduce_sum, init_distributed
from sere_scale.engine import build_engine
from sere_scale.run.metrics import MetricsLogger
from sere_scale.method.schedules import build_schedules
from sere_scale.run.step import Batches, StepResult, train_step
from sere_scale.run.trainlog import LiveMFU, LogWindow
from sere_scale.run.watchdog import HANG_MARKER, HangWatchdog

log = logging.getLogger("sere_scale")

# Written (rank 0) next to the checkpoints after a preemption checkpoint, for launchers that do not pass the
# workers' exit code on (torchrun exits 1 whenever a worker exits non-zero): slurm/ templates requeue on it.
REQUEUE_MARKER = "REQUEUE"


class Preemption:
    """SIGTERM / SIGUSR1 set a flag; the loop finishes the step, checkpoints and exits. Installed by
    ``main_train`` as soon as the process group exists (a signal during start-up is kept); repeated signals only
    set the flag again; loader workers ignore the job's signals (``data.worker_signals``)."""

    def __init__(self):
        self.flag = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                signal.signal(sig, self._handler)
            except (ValueError, OSError):  # not the main thread
                pass

    def _handler(self, signum, frame):
        self.flag = True


def global_count(local: int, info: DistInfo) -> int:
    """Sum of a per-rank count over all ranks."""
    if not info.distributed:
        return int(local)
    return int(all_reduce_sum(torch.tensor([float(local)], device=info.device)).item())


class Trainer:
    """``Trainer(cfg, ...).run()`` trains as configured. Nothing is written to ``output_dir`` before the config is
    validated against the model and data and the resume point is loaded (``startup.py``); a refused start leaves
    the folder as it was. Injectable: ``loader`` (built from ``data.*`` by default), ``method_cls`` (called as
    ``method_cls(cfg, num_heads)``), ``engine_factory`` (``engine.build_engine``'s signature); ``preempt``: the
    installed preemption handler; ``watchdog``: a started ``HangWatchdog``, told of every step."""

    def __init__(self, cfg: Config, info: DistInfo | None = None, *, resume: bool = False, move_old: bool = False,
                 preempt: Preemption | None = None, watchdog: HangWatchdog | None = None, loader=None,
                 method_cls=None, engine_factory=None):
        self.cfg, self.info = cfg, info or init_distributed()
        info, run_dir = self.info, Path(cfg.output_dir)
        self.trackers = startup.build_trackers_agreed(cfg, resume, info)  # a tracker that cannot start fails here
        self.lock = startup.check_run_dir(run_dir, resume, move_old, info)
        try:
            student, teacher, self.method = startup.build_model(cfg, method_cls)
            self.init_report = startup.init_weights(cfg, student, teacher, run_dir, resume)  # model.init_from
            startup.seed_everything(cfg.train.seed, info.rank)
            self.loader = loader if loader is not None else startup.build_loader(cfg, info, build_train_loader)
            augment = None
            if cfg.data.augment == "gpu":
                from sere_scale.data.encoded import DeviceAugment
                augment = DeviceAugment.from_config(cfg, info.device, info.rank)
            self.accum = cfg.train.grad_accum
            self.steps_per_epoch = self.loader.batches_per_epoch // self.accum
            if self.steps_per_epoch < 1:
                raise ConfigError(f"config key 'train.grad_accum': an epoch has {self.loader.batches_per_epoch} "
                                  f"batches per rank, fewer than train.grad_accum={self.accum}")
            self.sched = build_schedules(cfg, self.steps_per_epoch, info.world_size)
            if resume:
                startup.check_resume_config(run_dir, cfg, info, self.loader)
            self.engine = (engine_factory or build_engine)(cfg, student, teacher, self.method, info)
            self.state = {"step": 0, "epoch": 0, "batch": 0, "n_corrupt": 0, "n_skipped": 0, "n_overflow": 0}
            loaded = startup.load_resume(self.engine, run_dir, cfg, info, self.loader) if resume else None
            if loaded is not None:
                self.state = loaded["state"]
            self.resumed_from = loaded["path"] if loaded is not None else None
            # ---- from here on the run folder is written
            self.ckpt = startup.open_run_dir(cfg, run_dir, info, self.lock, loaded, self.loader,
                                             move_old and not resume, REQUEUE_MARKER)
        except BaseException:
            self.lock.release()
            raise
        if info.is_main:
            (run_dir / HANG_MARKER).unlink(missing_ok=True)
        self.metrics = MetricsLogger(run_dir, info.is_main, resume_step=self.state["step"] if resume else None,
                                     trackers=self.trackers)
        self.preempt = preempt or Preemption()
        self.watchdog = watchdog or HangWatchdog(cfg.train.hang_timeout_s, run_dir, info.rank)  # not started: inert
        self.batches = Batches(self.loader, self.state, info.device, augment)
        self.total = self.sched.total_steps if cfg.train.max_steps is None else min(self.sched.total_steps,
                                                                                     cfg.train.max_steps)
        self.window = LogWindow(cfg.data.batch_size * info.world_size * self.accum)
        self.mfu = LiveMFU(info.device, self.engine.precision) if cfg.train.log_mfu else None
        self.collapse = CollapseAlarm(cfg, info, self.metrics, self.ckpt)  # train.on_collapse
        self.last_record: dict = {}
        self.n_consecutive = 0
        self.pbar = None

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        """``fit`` with the trackers finished and the run folder's lock released whatever happens."""
        try:
            return self.fit()
        except BaseException as e:  # trackers finish once: a no-op after the loop's own close
            self.metrics.close("exited" if isinstance(e, SystemExit) else "error")
            raise
        finally:
            self.lock.release()

    def fit(self) -> dict:
        self._start()
        state, preempted = self.state, False
        while state["step"] < self.total and not preempted:
            s = self.sched.at(state["step"])
            res = self.train_step(s)
            preempted = res.preempted
            state["step"] += 1
            self.watchdog.beat(state["step"])
            self.batches.end_step(self.steps_per_epoch, self.accum)
            self.window.add(res)
            if self.pbar is not None:
                self.pbar.update(1)
            self.maybe_log(state["step"], s, res)
            self.maybe_checkpoint(state["step"], force=preempted)
            if self.n_consecutive >= self.cfg.train.max_consecutive_skips:
                self.metrics.close("nonfinite")
                raise nonfinite.diverged(self.cfg, self.ckpt, self.n_consecutive, state["step"])
        if self.pbar is not None:
            self.pbar.close()
        exit_reason = "preempted" if preempted else "done"
        self.metrics.close(exit_reason)
        return {"step": state["step"], "exit": exit_reason, "last": self.last_record, "engine": self.engine}

    def train_step(self, s: dict) -> StepResult:
        """``step.train_step`` on the next micro-batches, then the ``train.nonfinite`` policy."""
        before = (self.state["epoch"], self.state["batch"])
        with self.mfu.counting() if self.mfu is not None else contextlib.nullcontext():
            res = train_step(self.engine, self.method, self.batches, s, self.accum, self.info.world_size,
                             preempt_flag=lambda: self.preempt.flag)
        if res.finite:
            self.n_consecutive = 0
            if res.overflow:
                self.state["n_overflow"] = self.state.get("n_overflow", 0) + 1
            return res
        if self.cfg.train.nonfinite == "stop":
            self.state["epoch"], self.state["batch"] = before  # the state from before the failing step
            raise nonfinite.stop(self.cfg, self.engine, self.ckpt, self.state, res, self.metrics)
        self.state["n_skipped"] += 1
        self.n_consecutive += 1
        # the step's number as the metrics give it (state["step"] counts the steps done before it)
        log.warning("non-finite %s at step %d: step skipped (%d so far, %d in a row)", res.cause,
                    self.state["step"] + 1, self.state["n_skipped"], self.n_consecutive)
        return res

    # ------------------------------------------------------------------ hooks
    def _start(self) -> None:
        info, cfg = self.info, self.cfg
        if info.is_main:  # the banner first: the progress bar then starts on a line of its own
            banner = start_banner(cfg, info, self.engine, self.loader, self.total, self.steps_per_epoch,
                                  self.state["step"], self.resumed_from)
            if self.init_report:
                banner["init_from"] = self.init_report
            log_banner(banner)
            self.metrics.start(banner, cfg.to_dict())
        if info.is_main and cfg.train.progress and sys.stderr.isatty():
            from tqdm import tqdm
            self.pbar = tqdm(total=self.total, initial=self.state["step"], desc="train", dynamic_ncols=True)
        self.window.reset()

    def maybe_log(self, step: int, s: dict, res: StepResult) -> None:
        if step % self.cfg.train.log_every and step != self.total:
            return
        self.state["n_corrupt"] += global_count(self.window.take_corrupt(), self.info)
        rec = self.window.record(step, s, res, self.state, self.engine, self.mfu)
        self.maybe_eval(step, rec)
        self.metrics.log(rec)
        self.last_record = rec
        if self.pbar is not None:
            self.pbar.set_postfix(loss=f"{rec['loss']:.4f}")
        elif self.info.is_main:
            log.info("step %d/%d loss %.4f (image %.4f spatial %.4f channel %.4f) %.1f img/s", step, self.total,
                     rec["loss"], rec["loss_image"], rec["loss_spatial"], rec["loss_channel"], rec["img_per_s"])
        self.window.reset()
        self.collapse.after_log(step, rec)

    def maybe_eval(self, step: int, rec: dict) -> None:
        """At logging steps: the invariance, k-NN and dense hooks (``eval.invariance_every`` / ``knn_every`` /
        ``dense_every``)."""
        cfg = self.cfg
        if not (cfg.eval.invariance_every or cfg.eval.knn_every or cfg.eval.dense_every):
            return
        self.watchdog.extend("evaluation hooks")
        from sere_scale.eval.dense.segprobe import dense_during_training
        from sere_scale.eval.invariance import invariance_during_training
        from sere_scale.eval.knn import knn_during_training
        teacher_state = functools.cache(self.engine.teacher_state_dict)  # one (collective) gather for all
        rec.update(invariance_during_training(cfg, self.engine, step, self.info, teacher_state))
        rec.update(knn_during_training(cfg, self.engine, step, self.info, teacher_state))
        rec.update(dense_during_training(cfg, self.engine, step, self.info, teacher_state))
        del teacher_state  # frees the gathered copy
        self.watchdog.beat(step)

    def maybe_checkpoint(self, step: int, force: bool = False) -> None:
        if step % self.cfg.checkpoint.every_steps and step != self.total and not force:
            return
        self.state["n_corrupt"] += global_count(self.window.take_corrupt(), self.info)
        self.watchdog.extend("a checkpoint save")
        self.ckpt.save(self.engine, dict(self.state))
        self.watchdog.beat(step)
