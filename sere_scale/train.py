"""The training loop: joins data, method and engine; never branches on the backend."""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch

from . import nonfinite, startup
from .banner import log_banner, start_banner
from .checkpoint import CheckpointSaveError
from .config import Config, ConfigError
from .data.device import to_device as _to_device
from .data.loader import build_train_loader
from .distributed import DistInfo, all_reduce_sum, cleanup, init_distributed
from .engine import build_engine
from .method import SEREMethod
from .metrics import MetricsLogger
from .models.network import build_student_teacher
from .schedules import build_schedules
from .trackers import build_trackers
from .watchdog import HANG_MARKER, HangWatchdog

log = logging.getLogger("sere_scale")

EXIT_NONFINITE = 3
EXIT_REQUEUE = 124  # exit code after a preemption checkpoint (slurm/ templates requeue on it)
# Written (rank 0) next to the checkpoints after a preemption checkpoint, for launchers that do not pass the
# workers' exit code on (torchrun exits 1 whenever a worker exits non-zero): slurm/ templates requeue on it.
REQUEUE_MARKER = "REQUEUE"


NonFiniteLoss = nonfinite.NonFiniteLoss


class LiveMFU:
    """Counts one optimiser step's FLOPs (this rank) once, then reports model FLOPs utilisation."""

    def __init__(self, device, precision: str):
        self.device, self.precision = device, precision
        self.flops_per_step, self.peak, self._tried = 0, None, False

    def counting(self):
        if self._tried:
            return contextlib.nullcontext()
        self._tried = True
        from torch.utils.flop_counter import FlopCounterMode

        from .kernels import tally_kernel_flops
        from .profiling.flops import _cpu_sdpa_mapping, device_peak
        self.peak, _ = device_peak(self.device, self.precision)
        mode = FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_mapping())

        @contextlib.contextmanager
        def ctx():
            with tally_kernel_flops() as kernels, mode:  # + the fused Triton kernels FlopCounterMode cannot see
                yield
            self.flops_per_step = int(mode.get_total_flops()) + kernels[0]
        return ctx()

    def value(self, steps: int, seconds: float) -> float:
        return self.flops_per_step * steps / max(seconds, 1e-12) / self.peak


class _Preemption:
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


def _global_count(local: int, info: DistInfo) -> int:
    """Sum of a per-rank count over all ranks."""
    if not info.distributed:
        return int(local)
    return int(all_reduce_sum(torch.tensor([float(local)], device=info.device)).item())


def _seed_everything(seed: int, rank: int) -> None:
    import random

    import numpy as np
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def train(cfg: Config, resume: bool = False, info: DistInfo | None = None, move_old: bool = False,
          preempt: _Preemption | None = None, watchdog: HangWatchdog | None = None) -> dict:
    """Run training as configured; returns a summary dict (step reached, last metrics, exit reason).

    Nothing is written to ``output_dir`` before the config is validated against the model and data and the
    resume point is loaded (``startup.py``); a refused start leaves the folder as it was. ``preempt``: the
    installed preemption handler; ``watchdog``: a started ``HangWatchdog`` (``main_train``), told of every step;
    none by default."""
    info = info or init_distributed()
    run_dir = Path(cfg.output_dir)
    trackers = build_trackers(cfg) if info.is_main else []  # a missing tracker package fails before any write
    lock = startup.check_run_dir(run_dir, resume, move_old, info)
    # Models are built from the same seed on every rank (identical initial weights), then each rank gets
    # its own random stream (drop-path).
    torch.manual_seed(cfg.train.seed)
    student, teacher = build_student_teacher(cfg)
    startup.validate_built(cfg, student)
    method = SEREMethod(cfg, student.backbone.num_heads)
    _seed_everything(cfg.train.seed, info.rank)
    loader = startup.build_loader(cfg, info, build_train_loader)
    augment = None
    if cfg.data.augment == "gpu":
        from .data.encoded import DeviceAugment
        augment = DeviceAugment.from_config(cfg, info.device, info.rank)
    accum = cfg.train.grad_accum
    steps_per_epoch = loader.batches_per_epoch // accum
    if steps_per_epoch < 1:
        raise ConfigError(f"config key 'train.grad_accum': an epoch has {loader.batches_per_epoch} batches per "
                          f"rank, fewer than train.grad_accum={accum}")
    sched = build_schedules(cfg, steps_per_epoch, info.world_size)
    if resume:
        startup.check_resume_config(run_dir, cfg, info, loader)
    engine = build_engine(cfg, student, teacher, method, info)

    state = {"step": 0, "epoch": 0, "batch": 0, "n_corrupt": 0, "n_skipped": 0, "n_overflow": 0}
    loaded = startup.load_resume(engine, run_dir, cfg, info, loader) if resume else None
    if loaded is not None:
        state = loaded["state"]
    # ---- from here on the run folder is written
    ckpt = startup.open_run_dir(cfg, run_dir, info, lock, loaded, loader, move_old and not resume,
                                REQUEUE_MARKER)
    if info.is_main:
        (run_dir / HANG_MARKER).unlink(missing_ok=True)
    metrics = MetricsLogger(run_dir, info.is_main, resume_step=state["step"] if resume else None,
                            trackers=trackers)
    try:
        return _loop(cfg, info, engine, method, loader, augment, sched, ckpt, state, metrics, steps_per_epoch,
                     preempt or _Preemption(),
                     watchdog or HangWatchdog(cfg.train.hang_timeout_s, run_dir, info.rank),  # not started: inert
                     loaded["path"] if loaded is not None else None)
    except BaseException as e:  # trackers finish once: a no-op after the loop's own close
        metrics.close("exited" if isinstance(e, SystemExit) else "error")
        raise
    finally:
        lock.release()


def _loop(cfg, info, engine, method, loader, augment, sched, ckpt, state, metrics, steps_per_epoch, preempt,
          watchdog, latest) -> dict:
    accum = cfg.train.grad_accum

    total = sched.total_steps
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)
    pbar = None
    if info.is_main and cfg.train.progress and sys.stderr.isatty():
        from tqdm import tqdm
        pbar = tqdm(total=total, initial=state["step"], desc="train", dynamic_ncols=True)
    every = cfg.checkpoint.every_steps
    exit_reason = "done"
    last_record: dict = {}
    window_t, window_imgs, window_corrupt, window_wait, window_steps = time.perf_counter(), 0, 0, 0.0, 0
    global_batch = cfg.data.batch_size * info.world_size * accum
    mfu = LiveMFU(info.device, engine.precision) if cfg.train.log_mfu else None
    if info.is_main:
        banner = start_banner(cfg, info, engine, loader, total, steps_per_epoch, state["step"], latest)
        log_banner(banner)
        metrics.start(banner, cfg.to_dict())

    it = loader.epoch_iter(state["epoch"], state["batch"])
    stop_now, n_consecutive = False, 0
    while state["step"] < total:
        s = sched.at(state["step"])
        outs, finite = [], True
        before, buffers = (state["epoch"], state["batch"]), nonfinite.BufferSnapshot(engine)
        counting = mfu.counting() if mfu is not None else contextlib.nullcontext()
        with counting:
            for k in range(accum):
                t_wait = time.perf_counter()
                batch = next(it, None)
                if batch is None:  # end of epoch (every rank has the same number of batches)
                    state["epoch"] += 1
                    state["batch"] = 0
                    it = loader.epoch_iter(state["epoch"], 0)
                    batch = next(it)
                window_wait += time.perf_counter() - t_wait
                position = (state["epoch"], state["batch"])
                state["batch"] += 1
                batch = _to_device(batch, info.device, augment, position)
                window_corrupt += batch["n_corrupt"]
                with engine.no_sync(k < accum - 1):
                    with engine.autocast():
                        out = method(engine.student, engine.teacher, batch, s)
                    # one host sync per micro-batch: every rank's finiteness and any rank's preemption flag
                    flags = torch.stack([torch.isfinite(out["loss"].detach()).float(),
                                         torch.tensor(float(preempt.flag), device=info.device)])
                    n_finite, n_preempted = all_reduce_sum(flags).tolist()
                    stop_now = n_preempted > 0
                    if n_finite != info.world_size:
                        finite = False
                        break
                    engine.backward(out["loss"] / accum)
                outs.append(out)
        skipped = False
        if not finite:
            engine.zero_grad()
            method.discard_pending()
            buffers.restore()  # the failing forward wrote into BatchNorm running stats: undo it
            if cfg.train.nonfinite == "stop":
                state["epoch"], state["batch"] = before  # the state from before the failing step
                raise nonfinite.stop(cfg, engine, ckpt, state, out, metrics)
            state["n_skipped"] += 1
            n_consecutive += 1
            log.warning("non-finite loss at step %d: step skipped (%d so far, %d in a row)", state["step"],
                        state["n_skipped"], n_consecutive)
            skipped, outs, grad_norm = True, [out], None
        else:
            n_consecutive = 0
        if not skipped:
            grad_norm = engine.step(s["lr"], s["wd"], s["epoch"] < cfg.optim.freeze_last_layer)
            if engine.step_skipped:
                # fp16 overflow: the loss scaler skipped the optimiser step (and lowered the scale). The step is
                # skipped as a whole, as under train.nonfinite=skip: the teacher does not move, the centers ignore it.
                method.discard_pending()
                state["n_overflow"] = state.get("n_overflow", 0) + 1
            else:
                engine.ema_update(s["momentum"])
                method.after_step()
        state["step"] += 1
        watchdog.beat(state["step"])
        if state["batch"] >= steps_per_epoch * accum:  # epoch end; leftover (batches % accum) micro-batches dropped
            state["epoch"] += 1
            state["batch"] = 0
            it = loader.epoch_iter(state["epoch"], 0)
        window_imgs += global_batch
        window_steps += 1
        if pbar is not None:
            pbar.update(1)

        step = state["step"]
        if step % cfg.train.log_every == 0 or step == total:
            dt = time.perf_counter() - window_t
            state["n_corrupt"] += _global_count(window_corrupt, info)
            window_corrupt = 0
            rec = {"step": step, "epoch": s["epoch"], "lr": s["lr"], "wd": s["wd"], "momentum": s["momentum"],
                   "teacher_temp": s["teacher_temp"], "img_per_s": window_imgs / max(dt, 1e-9),
                   "grad_norm": float(grad_norm) if grad_norm is not None else None,
                   "n_corrupt": state["n_corrupt"], "n_skipped": state["n_skipped"],
                   "data_wait_pct": 100.0 * window_wait / max(dt, 1e-9)}
            if skipped:
                rec["skipped"] = True  # train.nonfinite=skip: this step's (non-finite) losses, no update
            if mfu is not None and mfu.flops_per_step:
                rec["mfu"] = mfu.value(window_steps, dt)
            scale = engine.loss_scale()
            if scale is not None:  # fp16: the scale after this step, and the steps skipped on overflow so far
                rec["loss_scale"], rec["n_overflow"] = scale, state.get("n_overflow", 0)
            for key in outs[0]:
                rec[key] = sum(float(o[key].detach()) for o in outs) / len(outs)
            if cfg.eval.invariance_every or cfg.eval.knn_every:
                watchdog.extend("evaluation hooks")
                from .eval.invariance import invariance_during_training
                from .eval.knn import knn_during_training
                teacher_state = functools.cache(engine.teacher_state_dict)  # one (collective) gather for both
                rec.update(invariance_during_training(cfg, engine, step, info, teacher_state))
                rec.update(knn_during_training(cfg, engine, step, info, teacher_state))
                del teacher_state  # frees the gathered copy
                watchdog.beat(step)
            metrics.log(rec)
            last_record = rec
            if pbar is not None:
                pbar.set_postfix(loss=f"{rec['loss']:.4f}")
            elif info.is_main:
                log.info("step %d/%d loss %.4f (image %.4f spatial %.4f channel %.4f) %.1f img/s", step, total,
                         rec["loss"], rec["loss_image"], rec["loss_spatial"], rec["loss_channel"], rec["img_per_s"])
            window_t, window_imgs, window_corrupt, window_wait, window_steps = time.perf_counter(), 0, 0, 0.0, 0

        if step % every == 0 or step == total or stop_now:
            state["n_corrupt"] += _global_count(window_corrupt, info)
            window_corrupt = 0
            watchdog.extend("a checkpoint save")
            ckpt.save(engine, dict(state))
            watchdog.beat(step)
        if n_consecutive >= cfg.train.max_consecutive_skips:
            metrics.close("nonfinite")
            raise nonfinite.diverged(cfg, ckpt, n_consecutive, state["step"])
        if stop_now:
            exit_reason = "preempted"
            break
    if pbar is not None:
        pbar.close()
    metrics.close(exit_reason)
    return {"step": state["step"], "exit": exit_reason, "last": last_record, "engine": engine}


def main_train(cfg: Config, resume: bool, move_old: bool = False) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    info = init_distributed(timeout_s=cfg.train.dist_timeout_s)
    # now, before anything slow: a SIGTERM/SIGUSR1 from here on is kept (one during the rendezvous, with nothing
    # to save yet, still ends the process at once instead of leaving it blocked until the launcher's SIGKILL)
    preempt = _Preemption()
    if not info.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)  # torchrun --max-restarts: > 0 after one
    if restart > 0 and not resume:
        log.warning("torchrun restarted the workers (TORCHELASTIC_RESTART_COUNT=%d): resuming from the newest "
                    "checkpoint", restart)
        resume = True
    watchdog = HangWatchdog(cfg.train.hang_timeout_s, cfg.output_dir, info.rank).start()
    try:
        result = train(cfg, resume=resume, info=info, move_old=move_old, preempt=preempt, watchdog=watchdog)
    except NonFiniteLoss as e:
        log.error("%s", e)
        cleanup()
        return EXIT_NONFINITE
    except CheckpointSaveError as e:
        log.error("%s", e)
        cleanup()
        return 1
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
