"""The collapse alarm (``train.on_collapse``: warn | stop | ignore), judged on the health figures of the logged
steps.

Three kinds, each a figure beyond its threshold at ``train.collapse_window`` logged steps in a row:

- ``uniform``: ``teacher_entropy`` (entropy of the teacher's CLS distribution, nats) ≥ ``collapse_uniform`` · ln K;
- ``one_hot``: ``teacher_entropy`` ≤ ``collapse_one_hot`` · ln K (K = ``image_loss.out_dim``);
- ``features``: ``feature_std`` (std of the L2-normalised student CLS over the batch · √dim; ≈1 healthy)
  ≤ ``collapse_feature_std``.

The entropy kinds apply to ``image_loss.kind`` dino and ibot only: MoCo v3 (and ``none``) have no teacher
distribution (MoCo's ``loss_image_norm`` is an InfoNCE CE / ln #keys, near 1 at the start of any run, so it is no
collapse test); ``features`` applies to every kind. Logged steps skipped by ``train.nonfinite=skip`` are ignored.

Rank 0 judges its own figures (those written to ``metrics.jsonl``; no extra host sync: they are already on the
host). A kind fires once per process: a loud warning naming the figure, its value, the threshold and the usual
remedies, an ``{"event": "collapse", "kind": ..., "step": ...}`` record in ``metrics.jsonl`` and the scalars
``collapse`` = 1 and ``collapse_<kind>`` = 1 to TensorBoard and the trackers. While a window is forming (from the
first logged step beyond a threshold) the newest checkpoint older than it is held from pruning
(``checkpoint.keep``), so a checkpoint from before the collapse survives.

With ``stop``, rank 0's decision is shared by one all-reduce of one number per logging step (multi-process runs
only; none with warn or ignore) and every rank raises :class:`CollapseStop` together (``sere-scale train`` exits
with ``EXIT_COLLAPSE`` = 4). Nothing is saved at the firing step; checkpoints written inside the window are
renamed ``step_XXXXXXXX.collapsed`` (kept, never loaded or pruned) and ``latest`` names the newest checkpoint
older than the window, the point ``--resume`` continues from (with other settings).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from sere_scale.engine.checkpoint import checkpoints
from sere_scale.engine.distributed import all_reduce_sum
from sere_scale.run.resume import set_aside

log = logging.getLogger("sere_scale")

REMEDIES = {
    "uniform": "lower image_loss.teacher_temp or a longer image_loss.warmup_teacher_temp_epochs, a smaller "
               "image_loss.out_dim, a larger data.batch_size, a higher optim.momentum_teacher, check optim.base_lr; "
               "the collapse guards image_loss.centering=sinkhorn_knopp, image_loss.koleo_weight (0.1), "
               "image_loss.head_bn=true; or image_loss.kind=mocov3, which cannot go uniform",
    "one_hot": "the teacher temperature is too low (raise image_loss.teacher_temp / warmup_teacher_temp) or the "
               "centering too weak (image_loss.center_momentum < 1), check optim.base_lr",
    "features": "every image gets the same representation: check optim.base_lr and the teacher temperature, a "
                "higher optim.momentum_teacher, a larger data.batch_size, image_loss.koleo_weight (0.1)",
}
MEANING = {"uniform": "the teacher's CLS distribution is uniform: the student learns nothing from it",
           "one_hot": "the teacher's CLS distribution is one-hot: one prototype takes every image",
           "features": "the student's CLS features no longer vary across images"}


class CollapseStop(RuntimeError):
    """``train.on_collapse=stop`` fired (raised on every rank together)."""


@dataclass
class Rule:
    kind: str
    figure: str
    threshold: float
    above: bool  # fires when figure >= threshold (else <=)
    how: str  # the threshold in words

    def beyond(self, v) -> bool:
        return isinstance(v, (int, float)) and math.isfinite(v) and (v >= self.threshold if self.above
                                                                     else v <= self.threshold)


def rules(cfg) -> list[Rule]:
    """The kinds judged for this config (see the module docstring)."""
    t, il = cfg.train, cfg.image_loss
    out = []
    if il.kind in ("dino", "ibot"):
        lnk = math.log(il.out_dim)
        out += [Rule("uniform", "teacher_entropy", t.collapse_uniform * lnk, True,
                     f"{t.collapse_uniform:g} ln K, K = {il.out_dim}"),
                Rule("one_hot", "teacher_entropy", t.collapse_one_hot * lnk, False,
                     f"{t.collapse_one_hot:g} ln K, K = {il.out_dim}")]
    out.append(Rule("features", "feature_std", t.collapse_feature_std, False, "train.collapse_feature_std"))
    return out


@dataclass
class Firing:
    rule: Rule
    step: int
    window: list  # (step, value) of the window's logged steps, oldest first

    @property
    def start(self) -> int:
        return self.window[0][0]


@dataclass
class CollapseDetector:
    """Pure logic: ``update`` with each logged record, returns the kinds that fire (each once)."""
    rules: list
    window: int
    streaks: dict = field(default_factory=dict)  # kind -> [(step, value)] of the current run beyond threshold
    fired: set = field(default_factory=set)

    def update(self, step: int, rec: dict) -> list[Firing]:
        if rec.get("skipped"):
            return []
        out = []
        for r in self.rules:
            if r.figure not in rec:
                continue
            v = rec[r.figure]
            streak = self.streaks.setdefault(r.kind, [])
            if not r.beyond(v):
                streak.clear()
                continue
            streak.append((step, float(v)))
            del streak[:-self.window]
            if len(streak) == self.window and r.kind not in self.fired:
                self.fired.add(r.kind)
                out.append(Firing(r, step, list(streak)))
        return out

    def forming_since(self) -> Optional[int]:
        """The first step of the oldest current run of figures beyond a threshold (None: all healthy)."""
        starts = [s[0][0] for s in self.streaks.values() if s]
        return min(starts) if starts else None


class CollapseAlarm:
    """The trainer's hook: ``after_log(step, rec)`` at every logging step, on every rank."""

    def __init__(self, cfg, info, metrics, ckpt):
        self.policy, self.info, self.metrics, self.ckpt = cfg.train.on_collapse, info, metrics, ckpt
        self.detector = CollapseDetector(rules(cfg), cfg.train.collapse_window)
        self._held_for: Optional[int] = None
        self._earliest: Optional[int] = None  # the first step of the windows fired so far

    def after_log(self, step: int, rec: dict) -> None:
        if self.policy == "ignore":
            return
        fired = self.detector.update(step, rec) if self.info.is_main else []
        for f in fired:
            self._announce(f)
            self._earliest = f.start if self._earliest is None else min(self._earliest, f.start)
        if self.info.is_main:
            self._hold(self.detector.forming_since())
        if self.policy == "stop" and self._agree(bool(fired)):
            raise self._stop(step)

    def _agree(self, flag: bool) -> bool:
        if not self.info.distributed:
            return flag
        return all_reduce_sum(torch.tensor([float(flag)], device=self.info.device)).item() > 0

    def _announce(self, f: Firing) -> None:
        r, value = f.rule, f.window[-1][1]
        sign = ">=" if r.above else "<="
        bar = "!" * 100
        log.warning("%s\nCOLLAPSE (%s) at step %d: %s = %.4g, %s the threshold %.4g (%s) at the last %d logged steps "
                    "(steps %d-%d): %s.\nUsual remedies: %s.\ntrain.on_collapse=%s%s\n%s", bar, r.kind, f.step,
                    r.figure, value, sign, r.threshold, r.how, len(f.window), f.start, f.step, MEANING[r.kind],
                    REMEDIES[r.kind], self.policy, ": stopping (exit code 4)" if self.policy == "stop"
                    else ": training goes on (stop: exit with the checkpoint from before the window)", bar)
        self.metrics.event({"event": "collapse", "kind": r.kind, "step": f.step, "figure": r.figure, "value": value,
                            "threshold": r.threshold, "above": r.above, "window_start": f.start,
                            "window": [v for _, v in f.window], "action": self.policy},
                           {"collapse": 1, f"collapse_{r.kind}": 1})

    def _before(self, start: int) -> list:
        """This run's checkpoints (newest first) and the newest one older than step ``start`` (or None)."""
        cks = sorted(checkpoints(self.ckpt.root, self.ckpt.meta.get("run_id")), key=_step, reverse=True)
        return cks, next((c for c in cks if _step(c) < start), None)

    def _hold(self, since: Optional[int]) -> None:
        if since == self._held_for:
            return
        self._held_for = since
        good = self._before(since)[1] if since is not None else None
        self.ckpt.hold = {good.name} if good is not None else set()

    def _stop(self, step: int) -> CollapseStop:
        where = "rank 0's figures"
        if self.info.is_main:
            cks, good = self._before(self._earliest)
            set_aside([c for c in cks if _step(c) >= self._earliest], why="collapsed")
            self.ckpt.set_latest(good.name if good is not None else None)
            where = (f"'latest' names {good}, the newest checkpoint from before the collapse window (from step "
                     f"{self._earliest}): --resume continues from it" if good is not None else
                     f"no checkpoint is older than the collapse window (from step {self._earliest})")
        self.metrics.close("collapse")
        return CollapseStop(f"training collapsed (train.on_collapse=stop) at step {step}; {where}. Checkpoints "
                            f"written inside the window are renamed *.collapsed; see the warning above for remedies.")


def _step(ck) -> int:
    return int(ck.name.split("_")[-1])
