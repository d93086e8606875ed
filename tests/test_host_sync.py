"""Host synchronisations per non-logging training step: the number documented in ``run/step.py`` (and
docs/ARCHITECTURE.md): one (the finiteness + preemption vote) whatever ``train.grad_accum``; ``accum`` for an
engine that votes before every micro-batch's backward (``check_every_micro_batch``, DeepSpeed).

On CPU every tensor-to-host conversion made by the package's code is counted by patching ``torch.Tensor``
(``item``, ``tolist``, ``float()``, ``int()``, ``bool()``, ``cpu()``, ``numpy()``, called from a ``sere_scale/``
frame), outside data loading (the loader works on host tensors). torch's own conversions are left out: on CPU
they read host-resident values (AdamW's step counts, which torch keeps on the host to avoid a sync on CUDA).
On CUDA, ``torch.cuda.set_sync_debug_mode`` counts every synchronisation instead.
"""
import contextlib
import os
import sys
import warnings

import pytest
import torch

import sere_scale
from sere_scale.run import step as step_module
from sere_scale.engine import build_engine
from sere_scale.run.train import train
from tests.conftest import digits_subset
from tests.tiny import tiny_config

OURS = os.path.dirname(os.path.abspath(sere_scale.__file__)) + os.sep  # the package's own files (not tests/)
CONVERSIONS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy")


class SyncCounter:
    """Counts host conversions of tensors while ``active`` (and not inside data loading)."""

    def __init__(self, monkeypatch):
        self.n, self.active, self.where = 0, True, []
        for name in CONVERSIONS:
            orig = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(orig, name))
        real_next = step_module.Batches.next

        def next_batch(batches, timer=step_module.no_timer):
            with self.paused():
                return real_next(batches, timer)
        monkeypatch.setattr(step_module.Batches, "next", next_batch)

    def _wrap(self, orig, name):
        def counted(t, *a, **k):
            if self.active:
                caller = sys._getframe(1).f_code
                if os.path.abspath(caller.co_filename).startswith(OURS):
                    self.n += 1
                    self.where.append(f"{name} in {caller.co_filename.split(OURS)[-1]}:{caller.co_name}")
            return orig(t, *a, **k)
        return counted

    @contextlib.contextmanager
    def paused(self):
        was, self.active = self.active, False
        try:
            yield
        finally:
            self.active = was


class BeatRecorder:
    """A stand-in hang watchdog: records the sync count at every step's beat."""

    def __init__(self, counter):
        self.counter, self.at = counter, {}

    def beat(self, step):
        self.at[step] = self.counter.n

    def extend(self, what):
        pass


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, digits_root):
    return digits_subset(digits_root, tmp_path_factory.mktemp("small"), 3, 12)


def _syncs_per_step(tmp_path, data, monkeypatch, accum, every_micro_batch=False):
    steps = 6
    cfg = tiny_config(tmp_path / "run", data, f"train.max_steps={steps}", f"train.grad_accum={accum}",
                      "data.batch_size=4", f"train.log_every={10 * steps}", f"checkpoint.every_steps={10 * steps}")

    def engine_factory(*a, **k):
        eng = build_engine(*a, **k)
        eng.check_every_micro_batch = every_micro_batch
        return eng
    counter = SyncCounter(monkeypatch)
    beats = BeatRecorder(counter)
    train(cfg, watchdog=beats, engine_factory=engine_factory)
    # beat k -> beat k+1: the hooks of step k (no logging, no checkpoint for k < steps) and step k+1
    return [beats.at[k + 1] - beats.at[k] for k in range(1, steps - 1)], counter


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU counting; the CUDA case below uses sync debug mode")
@pytest.mark.parametrize("accum, every, expected", [(1, False, 1), (2, False, 1), (3, False, 1), (2, True, 2)])
def test_host_syncs_per_non_logging_step(tmp_path, small_data, monkeypatch, accum, every, expected):
    per_step, counter = _syncs_per_step(tmp_path, small_data, monkeypatch, accum, every)
    assert per_step == [expected] * len(per_step), (per_step, counter.where)


def test_the_counter_sees_a_sync(monkeypatch):
    """The patching itself: the vote's ``tolist()`` (our code) is counted, device-side ops are not, nor are
    conversions made outside the package (here: this test's own ``float()``)."""
    counter = SyncCounter(monkeypatch)
    y = (torch.ones(3) * 2).sum()
    float(y)
    assert counter.n == 0
    assert step_module._vote(torch.isfinite(y), False, 1, torch.isfinite(y)) == (True, True, False)
    assert counter.n == 1 and counter.where == [f"tolist in {os.path.join('run', 'step.py')}:_vote"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.set_sync_debug_mode)")
def test_host_syncs_per_step_on_cuda(tmp_path, small_data, monkeypatch):
    """On CUDA: the synchronising calls torch warns about between two beats of non-logging steps, those of data
    loading (host-to-device copies of the loader's batches) left out."""
    steps = 6
    cfg = tiny_config(tmp_path / "run", small_data, f"train.max_steps={steps}", "data.batch_size=4",
                      f"train.log_every={10 * steps}", f"checkpoint.every_steps={10 * steps}")
    seen, in_data = [], [0]

    class Count:
        @property
        def n(self):
            return sum("synchroniz" in str(w.message) for w in seen) - in_data[0]
    beats = BeatRecorder(Count())
    real_next = step_module.Batches.next

    def next_batch(batches, timer=step_module.no_timer):
        before = len(seen)
        out = real_next(batches, timer)
        in_data[0] += sum("synchroniz" in str(w.message) for w in seen[before:])
        return out
    monkeypatch.setattr(step_module.Batches, "next", next_batch)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        seen = rec
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train(cfg, watchdog=beats)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    per_step = [beats.at[k + 1] - beats.at[k] for k in range(1, steps - 1)]
    assert per_step == [1] * len(per_step), per_step
