"""Experiment trackers (rank 0 only), fed by :class:`sere_scale.run.metrics.MetricsLogger`.

Each tracker gets the resolved config and the start-up banner once per run segment (``start``), every logged
record's scalars at its step (``log``), under the names TensorBoard uses (``train/loss``, ``train/lr``, ...:
:func:`metric_names`), and ``finish(exit_reason)`` when training ends — done, preempted (SIGTERM: the
checkpoint is written first), stopped on a non-finite loss or on an exception.

* ``log.wandb.enabled``: Weights & Biases (``pip install sere_scale[wandb]``): ``project``, ``entity``,
  ``name`` (run name; default: the output folder's name), ``mode`` (online | offline | disabled; the
  ``WANDB_MODE`` environment variable, if set, wins, as in wandb itself), ``tags``.
* ``log.mlflow.enabled``: MLflow (``pip install sere_scale[mlflow]``): ``tracking_uri`` (default: MLflow's
  own: ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory for MLflow 3),
  ``experiment``, ``run_name``.
* ``log.hooks``: generic trackers, ``"package.module:factory"``; ``factory(cfg)`` returns an object with
  ``start(config, banner)``, ``log(scalars, step)``, ``finish(exit_reason)`` and optionally ``check()``.

One run = one tracker run: the run folder remembers each tracker's run id (:mod:`.tracker_runs`,
``trackers.json``); ``--resume``, a requeue or a torchrun restart reopens it (W&B ``id=…, resume="allow"``,
MLflow ``start_run(run_id=…)``), a fresh start begins a new one. Steps a tracker already holds (logged after
the checkpoint the run resumed from) are not sent again: W&B refuses steps below its last one and MLflow would
keep two values at one step; resumes are exact, so the held values are those ``metrics.jsonl`` gets again.

Fail fast: a configured tracker that cannot start (package missing, hook not importable, tracking store
refused or unreachable, a remembered run missing from its store) is a config error naming the key (exit 2),
found by :func:`build_trackers` before anything is written; a failure of ``start`` itself also stops the run.
``log.tracker_errors=warn`` turns these into a warning and trains without that tracker. A tracker failing later,
while logging, is always reported and dropped: an outage must not stop a multi-day run.
"""
from __future__ import annotations

import importlib
import logging
import os
import secrets
from pathlib import Path

from sere_scale.config.load import ConfigError
from sere_scale.run.tracker_runs import TrackerRuns

log = logging.getLogger("sere_scale")


def scalars(record: dict) -> dict:
    """The numeric entries of a metrics record (``step`` and ``time`` excluded; None/NaN kept out)."""
    out = {}
    for k, v in record.items():
        if k in ("step", "time") or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if v != v or v in (float("inf"), float("-inf")):
            continue
        out[k] = v
    return out


def metric_names(values: dict) -> dict:
    """A record's scalars under the names every sink uses: TensorBoard, W&B, MLflow and hooks (``train/<key>``)."""
    return {f"train/{k}": v for k, v in values.items()}


class WandbTracker:
    key, config_key, check_key = "wandb", "log.wandb.enabled", "log.wandb.mode"

    def __init__(self, cfg, previous: dict):
        self.cfg, self.previous, self.run = cfg, previous, None

    def check(self) -> None:
        mode = os.environ.get("WANDB_MODE") or self.cfg.log.wandb.mode
        if mode not in ("online", "offline", "disabled", "dryrun", "run", "shared"):
            raise ValueError(f"unknown W&B mode '{mode}' (WANDB_MODE or log.wandb.mode)")

    def start(self, config: dict, banner: dict) -> dict:
        import wandb
        w = self.cfg.log.wandb
        mode = os.environ.get("WANDB_MODE") or w.mode
        run_id = self.previous.get("id") or secrets.token_hex(4)
        self.run = wandb.init(project=w.project or None, entity=w.entity or None,
                              name=w.name or Path(self.cfg.output_dir).name, mode=mode, tags=list(w.tags) or None,
                              dir=self.cfg.output_dir, config=config, id=run_id, resume="allow")
        self.run.summary["start"] = banner
        return {"id": getattr(self.run, "id", None) or run_id}

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def finish(self, exit_reason: str) -> None:
        self.run.summary["exit"] = exit_reason
        self.run.finish(exit_code=0 if exit_reason in ("done", "preempted") else 1)


class MlflowTracker:
    key, config_key, check_key = "mlflow", "log.mlflow.enabled", "log.mlflow.tracking_uri"

    def __init__(self, cfg, previous: dict):
        self.cfg, self.previous = cfg, previous

    def check(self) -> None:
        """Open the tracking store (MLflow refuses a ``file:`` store unless ``MLFLOW_ALLOW_FILE_STORE=true``,
        and an unknown scheme) and find the remembered run in it."""
        import mlflow
        uri = self.cfg.log.mlflow.tracking_uri or mlflow.get_tracking_uri()
        client = mlflow.MlflowClient(tracking_uri=uri)
        run_id = self.previous.get("run_id")
        if run_id:
            try:
                client.get_run(run_id)
            except Exception as e:  # noqa: BLE001 — MLflow raises its own exception types
                raise ValueError(f"the MLflow run {run_id} this run folder's trackers.json names is not in the "
                                 f"tracking store '{uri}' ({type(e).__name__}: {e})") from None
        else:
            client.search_experiments(max_results=1)

    def start(self, config: dict, banner: dict) -> dict:
        import mlflow
        m = self.cfg.log.mlflow
        if m.tracking_uri:
            mlflow.set_tracking_uri(m.tracking_uri)
        run_id = self.previous.get("run_id")
        if run_id:  # reopened: its params are the first segment's (MLflow refuses changed values)
            run = mlflow.start_run(run_id=run_id)
            step = (banner.get("resume") or {}).get("step", 0)
            mlflow.log_dict({"start": banner}, f"start_step{step}.json")
        else:
            if m.experiment:
                mlflow.set_experiment(m.experiment)
            run = mlflow.start_run(run_name=m.run_name or Path(self.cfg.output_dir).name)
            mlflow.log_params(_flat(config))
            mlflow.log_dict({"config": config, "start": banner}, "config.json")
        return {"run_id": run.info.run_id, "tracking_uri": mlflow.get_tracking_uri()}

    def log(self, values: dict, step: int) -> None:
        import mlflow
        mlflow.log_metrics(values, step=step)

    def finish(self, exit_reason: str) -> None:
        import mlflow
        mlflow.set_tag("exit", exit_reason)
        mlflow.end_run(status="FINISHED" if exit_reason in ("done", "preempted") else "FAILED")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


def _require(module: str) -> None:
    import importlib.util
    import sys
    if module in sys.modules:  # imported already (None there: known missing)
        missing = sys.modules[module] is None
    else:
        missing = importlib.util.find_spec(module) is None
    if missing:
        raise ImportError(f"the {module} package is not installed (pip install 'sere_scale[{module}]')")


def _refuse(cfg, key: str, reason: str) -> None:
    """A tracker that cannot start: a config error, or with ``log.tracker_errors=warn`` a warning."""
    msg = f"config key '{key}': the tracker cannot start: {reason}"
    if cfg.log.tracker_errors == "warn":
        log.warning("%s — training without it (log.tracker_errors=warn)", msg)
        return
    raise ConfigError(f"{msg}. Fix it, or set log.tracker_errors=warn to train without this tracker")


def build_trackers(cfg, resume: bool = False) -> "Trackers":
    """The trackers ``cfg.log`` asks for, each checked (package, store, remembered run) before anything is
    written; ``resume`` reopens the tracker runs the run folder remembers."""
    runs = TrackerRuns(cfg.output_dir, resume)
    out = []
    for cls, on in ((WandbTracker, cfg.log.wandb.enabled), (MlflowTracker, cfg.log.mlflow.enabled)):
        if not on:
            continue
        t = cls(cfg, runs.get(cls.key))
        try:
            _require(cls.key)
        except ImportError as e:
            _refuse(cfg, cls.config_key, str(e))
            continue
        try:
            t.check()
        except Exception as e:  # noqa: BLE001 — any reason the tracker cannot start
            _refuse(cfg, cls.check_key, f"{type(e).__name__}: {e}")
            continue
        out.append((t.key, cls.config_key, t))
    for i, spec in enumerate(cfg.log.hooks):
        mod, _, name = spec.partition(":")
        try:
            t = getattr(importlib.import_module(mod), name or "tracker")(cfg)
            if hasattr(t, "check"):
                t.check()
        except Exception as e:  # noqa: BLE001
            _refuse(cfg, f"log.hooks[{i}]", f"'{spec}': {type(e).__name__}: {e}")
            continue
        out.append((f"hook:{spec}", f"log.hooks[{i}]", t))
    return Trackers(out, runs, cfg.log.tracker_errors)


class Trackers:
    """The configured trackers, called together: ``(key, config key, tracker)`` entries, the run folder's
    memory of their runs, and the ``log.tracker_errors`` policy for a failing ``start``."""

    def __init__(self, entries: list, runs: TrackerRuns | None = None, errors: str = "raise"):
        self.entries, self.runs, self.errors, self.finished = list(entries), runs, errors, False
        # the last step each tracker holds from earlier segments of the run: not sent again (later steps of this
        # segment are, even twice at one step: an event record at a logged step)
        self.held = {key: (runs.get(key).get("last_step", 0) if runs else 0) for key, _, _ in self.entries}

    def _drop(self, entry, method: str, e: Exception) -> None:
        log.warning("tracker %s.%s failed (%s: %s): dropped", type(entry[2]).__name__, method, type(e).__name__, e)
        self.entries.remove(entry)

    def start(self, config: dict, banner: dict) -> None:
        if self.entries:
            import atexit
            atexit.register(self.finish, "exited")  # an exception or sys.exit before close() still finishes
        fresh = not banner.get("resume")  # no checkpoint loaded: step 0, so new tracker runs as well
        for entry in list(self.entries):
            key, config_key, t = entry
            if fresh and self.runs is not None and self.runs.data.pop(key, None) is not None:
                self.held[key] = 0
                if hasattr(t, "previous"):
                    t.previous = {}
            try:
                ids = t.start(config, banner)
            except Exception as e:  # noqa: BLE001
                self.entries.remove(entry)
                if self.errors != "warn":
                    raise ConfigError(f"config key '{config_key}': the tracker could not start ({type(e).__name__}: "
                                      f"{e}); set log.tracker_errors=warn to train without it") from e
                log.warning("tracker %s could not start (%s: %s): training without it", key, type(e).__name__, e)
                continue
            if self.runs is not None:
                self.runs.update(key, **(ids if isinstance(ids, dict) else {}))

    def log(self, record: dict) -> None:
        values = scalars(record)
        if not values or "step" not in record:
            return
        step, named, sent = int(record["step"]), metric_names(values), False
        try:
            for entry in list(self.entries):
                key = entry[0]
                if step <= self.held.get(key, 0):
                    continue  # the tracker holds this step already (logged after the checkpoint we resumed from)
                try:
                    entry[2].log(dict(named), step)
                except Exception as e:  # noqa: BLE001 — a tracker outage must not stop training
                    self._drop(entry, "log", e)
                    continue
                sent = True
                if self.runs is not None:
                    mem = self.runs.data.setdefault(key, {})
                    mem["last_step"] = max(step, mem.get("last_step", 0))
        finally:  # also when a tracker's call ends the process (SystemExit): what was sent is remembered
            if sent and self.runs is not None:
                self.runs.write()

    def finish(self, exit_reason: str) -> None:
        if not self.finished:
            self.finished = True
            for entry in list(self.entries):
                try:
                    entry[2].finish(exit_reason)
                except Exception as e:  # noqa: BLE001
                    self._drop(entry, "finish", e)
