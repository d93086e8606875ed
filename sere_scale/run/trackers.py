"""Experiment trackers (rank 0 only), fed by :class:`sere_scale.run.metrics.MetricsLogger`.

Each tracker gets the resolved config and the start-up banner once (``start``), every logged record's
scalars at its step (``log``) and ``finish(exit_reason)`` when training ends — done, preempted (SIGTERM:
the checkpoint is written first), stopped on a non-finite loss or on an exception.

* ``log.wandb.enabled``: Weights & Biases (``pip install sere_scale[wandb]``): ``project``, ``entity``,
  ``name`` (run name; default: the output folder's name), ``mode`` (online | offline | disabled; the
  ``WANDB_MODE`` environment variable, if set, wins, as in wandb itself), ``tags``.
* ``log.mlflow.enabled``: MLflow (``pip install sere_scale[mlflow]``): ``tracking_uri`` (default: MLflow's
  own, ``MLFLOW_TRACKING_URI``), ``experiment``, ``run_name``.
* ``log.hooks``: generic trackers, ``"package.module:factory"``; ``factory(cfg)`` returns an object with
  ``start(config, banner)``, ``log(scalars, step)``, ``finish(exit_reason)``.
"""
from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

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


class WandbTracker:
    def __init__(self, cfg):
        self.cfg, self.run = cfg, None

    def start(self, config: dict, banner: dict) -> None:
        import wandb
        w = self.cfg.log.wandb
        mode = os.environ.get("WANDB_MODE") or w.mode
        self.run = wandb.init(project=w.project or None, entity=w.entity or None,
                              name=w.name or Path(self.cfg.output_dir).name, mode=mode, tags=list(w.tags) or None,
                              dir=self.cfg.output_dir, config=config)
        self.run.summary["start"] = banner

    def log(self, values: dict, step: int) -> None:
        self.run.log({f"train/{k}": v for k, v in values.items()}, step=step)

    def finish(self, exit_reason: str) -> None:
        self.run.summary["exit"] = exit_reason
        self.run.finish(exit_code=0 if exit_reason in ("done", "preempted") else 1)


class MlflowTracker:
    def __init__(self, cfg):
        self.cfg = cfg

    def start(self, config: dict, banner: dict) -> None:
        import mlflow
        m = self.cfg.log.mlflow
        if m.tracking_uri:
            mlflow.set_tracking_uri(m.tracking_uri)
        if m.experiment:
            mlflow.set_experiment(m.experiment)
        mlflow.start_run(run_name=m.run_name or Path(self.cfg.output_dir).name)
        mlflow.log_params(_flat(config))
        mlflow.log_dict({"config": config, "start": banner}, "config.json")

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


def _require(module: str, key: str) -> None:
    import importlib.util
    import sys
    if module in sys.modules:  # imported already (None there: known missing)
        missing = sys.modules[module] is None
    else:
        missing = importlib.util.find_spec(module) is None
    if missing:
        from sere_scale.config.load import ConfigError
        raise ConfigError(f"config key '{key}': the {module} package is not installed "
                          f"(pip install 'sere_scale[{module}]')")


def build_trackers(cfg) -> list:
    """The trackers ``cfg.log`` asks for (a missing package is a config error, raised before anything runs)."""
    out = []
    for key, module in (("log.wandb.enabled", "wandb"), ("log.mlflow.enabled", "mlflow")):
        if getattr(cfg.log, module).enabled:
            _require(module, key)
    if cfg.log.wandb.enabled:
        out.append(WandbTracker(cfg))
    if cfg.log.mlflow.enabled:
        out.append(MlflowTracker(cfg))
    for spec in cfg.log.hooks:
        mod, _, name = spec.partition(":")
        out.append(getattr(importlib.import_module(mod), name or "tracker")(cfg))
    return out


class Trackers:
    """The configured trackers, called together; a failing tracker is reported and dropped, never stops
    training."""

    def __init__(self, trackers: list):
        self.trackers, self.finished = list(trackers), False

    def _each(self, method: str, *args) -> None:
        for t in list(self.trackers):
            try:
                getattr(t, method)(*args)
            except Exception as e:  # noqa: BLE001 — a tracker outage must not stop training
                log.warning("tracker %s.%s failed (%s: %s): dropped", type(t).__name__, method, type(e).__name__, e)
                self.trackers.remove(t)

    def start(self, config: dict, banner: dict) -> None:
        if self.trackers:
            import atexit
            atexit.register(self.finish, "exited")  # an exception or sys.exit before close() still finishes
        self._each("start", config, banner)

    def log(self, record: dict) -> None:
        values = scalars(record)
        if values and "step" in record:
            self._each("log", values, int(record["step"]))

    def finish(self, exit_reason: str) -> None:
        if not self.finished:
            self.finished = True
            self._each("finish", exit_reason)
