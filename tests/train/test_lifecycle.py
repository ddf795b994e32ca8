"""The training lifecycle inside one process: non-finite steps skipped, counted and stopping the run;
metrics.jsonl kept across runs; stop signals; the step control's checkpoint clock; blaming a peer.

Through the command line, with real signals and killed processes: tests/reliability/test_lifecycle_*.py.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time

import torch
import torch.distributed as dist

from fastllm import tree
from fastllm.config import apply_overrides
from fastllm.train import checkpointing
from fastllm.train.control import BadSteps, StepControl
from fastllm.train.metrics import MetricsLog, read_metrics
from fastllm.train.peers import Peers
from fastllm.train.signals import StopSignals
from fastllm.train.trainer import Trainer
from test_trainer import dataset, losses, make_config  # noqa: F401 - the module's dataset fixture

NAN = float("nan")


class Poisoned:
    """The trainer's step with NaN gradients and loss at the chosen steps (1-based, as logged);
    remembers the state around each poisoned step."""

    def __init__(self, step, bad_steps):
        self.step, self.bad_steps, self.around = step, set(bad_steps), {}
        real = step.gradients

        def gradients(state, batch):
            grads, loss, tokens = real(state, batch)
            if state.step + 1 in self.bad_steps:
                return tree.map(lambda g: g * NAN, grads), loss * NAN, tokens
            return grads, loss, tokens

        step.gradients = gradients

    def __getattr__(self, name):  # init_state, plan, ...: the real step's
        return getattr(self.step, name)

    def __call__(self, state, batch):
        before = _copy((state.params, state.opt_state))
        new, metrics = self.step(state, batch)
        if new.step in self.bad_steps:  # copies: the next step updates these tensors in place
            self.around[new.step] = (before, _copy((new.params, new.opt_state)))
        return new, metrics


def _copy(values):
    return tree.map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, values)


def poisoned_trainer(config, bad_steps) -> tuple[Trainer, Poisoned]:
    trainer = Trainer(config)
    trainer.train_step = Poisoned(trainer.train_step, bad_steps)
    return trainer, trainer.train_step


def test_a_nan_step_is_skipped_and_reported(tmp_path, dataset, capsys):
    trainer, poisoned = poisoned_trainer(make_config(tmp_path, dataset), [3])
    result = trainer.run()
    assert result.stopped is None and result.state.step == 6
    before, after = poisoned.around[3]
    for a, b in zip(tree.leaves(before), tree.leaves(after)):  # the update was not applied
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    records = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r}
    assert math.isnan(records[3]["loss"]) and records[3]["skipped"] == 1
    assert all("skipped" not in r for step, r in records.items() if step != 3)
    assert all(math.isfinite(r["loss"]) for step, r in records.items() if step != 3)
    assert "step 3: 1 update(s) skipped for a non-finite loss or gradient (the last at step 3" in capsys.readouterr().out
    assert math.isnan(result.history[2]["loss"]) and math.isfinite(result.final_loss)  # numbers, not strings


def test_bad_steps_in_a_row_stop_the_run_with_its_last_good_checkpoint(tmp_path, dataset):
    config = make_config(tmp_path, dataset, steps=8, max_bad_steps=3, checkpoint_every=2, checkpoint_minutes=0.0)
    trainer, _ = poisoned_trainer(config, range(4, 9))
    result = trainer.run()
    assert result.state.step == 6 and result.stopped.code == 1
    assert result.stopped.message.startswith("error: stopped at step 6: 3 steps in a row had a non-finite loss or "
                                             "gradient (train.max_bad_steps=3); no update after step 3 was applied")
    assert checkpointing.latest(tmp_path).name == "step-00000004"  # no save at the stop: 4 holds step 3's weights
    assert [s for s, _ in losses(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_metrics_log_keeps_the_earlier_run_and_drops_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in (1, 2, 3, 4):
        log.write({"step": step, "loss": NAN if step == 2 else torch.tensor(float(step))})
    with path.open("a") as file:
        file.write('{"step": 5, "lo')  # the writer was killed mid-line
    resumed = MetricsLog(path, start_step=3)
    assert [r["step"] for r in resumed.kept] == [1, 2, 3] and math.isnan(resumed.kept[1]["loss"])
    assert resumed.write({"step": 4, "loss": 0.5}) == {"step": 4, "loss": 0.5}
    assert [(r["step"], r["loss"]) for r in read_metrics(path) if r["step"] != 2] == [(1, 1.0), (3, 3.0), (4, 0.5)]
    assert '"loss": "nan"' in path.read_text()  # valid JSON on disk
    assert not list(tmp_path.glob("*.tmp-*"))


def test_stop_signals_record_the_first_and_restore_the_handlers():
    previous = signal.getsignal(signal.SIGTERM)
    with StopSignals(repeat_window_s=60.0) as signals:
        assert signals.received == 0
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # an echo within the window: ignored
        time.sleep(0.01)  # handlers run between bytecodes of the main thread
        assert signals.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is previous
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


class _Flags:
    received = 0


def test_the_checkpoint_clock_asks_for_a_save_and_starts_again():
    control = StepControl(None, _Flags(), checkpoint_s=0.05)
    assert not control.after_step().checkpoint
    time.sleep(0.06)
    assert control.after_step().checkpoint
    control.saved()
    assert not control.after_step().checkpoint
    assert not StepControl(None, _Flags(), checkpoint_s=0.0).after_step().checkpoint  # 0: no clock


def test_bad_step_counts_stay_on_the_device_until_read():
    bad = BadSteps(torch.device("cpu"))
    for step, flag in enumerate([False, True, True, False, True], start=1):
        bad.add(torch.tensor(flag), step)
    assert bad.read() == (3, 1, 2, 5)  # in all, in a row now, longest run, last bad step


def test_blame_names_the_dead_the_failed_and_else_the_hung():
    store = dist.HashStore()
    others = Peers(store, 3, 4, interval_s=0.05)  # rank 3 beats on
    me = Peers(store, 0, 4, interval_s=0.05)
    Peers(store, 1, 4, interval_s=0.05).close()  # rank 1 beat, then stopped: died
    store.set("said/2", "error: ValueError: boom")
    try:
        blame = me.blame(window_s=0.3)
        assert blame.culprits == {1: "died (no heartbeat for 0.3 s: killed, crashed or frozen)",
                                  2: "failed: ValueError: boom"}
        assert blame.speaker(4) == 0
        store.set("said/1", "peer: connection closed")
        store.set("said/2", "peer: connection closed")
        blame = me.blame(window_s=0.3, timeout_s=9.0)
        assert blame.culprits == {3: "hangs (alive, but did not join a collective within run.timeout_s=9)"}
        store.set("said/0", "error: rank 0's own bad input")
        assert Peers.blame(others, window_s=0.1).speaker(4) is None  # rank 0 printed its own error
    finally:
        me.close()
        others.close()
    assert not [t for t in threading.enumerate() if t.name == "fastllm-heartbeat"]


def test_asynchronous_checkpoints_equal_blocking_ones_and_resume_alike(tmp_path, dataset):
    """The background writer saves the state as it was at its step (the next step changes the
    tensors in place), atomically, and a run resumes from it exactly as from a blocking save."""
    from fastllm.sharding import checkpoint as sharded

    blocking, background = tmp_path / "blocking", tmp_path / "background"
    Trainer(make_config(blocking, dataset, checkpoint_every=2, keep_checkpoints=3)).run()
    config = apply_overrides(make_config(background, dataset, checkpoint_every=2, keep_checkpoints=3,
                                         async_checkpoint=True), ["data.prefetch=2"])
    Trainer(config).run(stop_at=4)
    resumed = Trainer(config).run()
    assert [r["step"] for r in resumed.history if "loss" in r] == [5, 6]
    assert losses(background) == losses(blocking)
    for step in (2, 4, 6):
        name = f"step-{step:08d}"
        meta, trees = sharded.load_full(blocking / "checkpoints" / name)
        meta_bg, trees_bg = sharded.load_full(background / "checkpoints" / name)
        assert meta_bg["data"] == meta["data"] and meta_bg["step"] == step
        for a, b in zip(tree.leaves(trees), tree.leaves(trees_bg)):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    assert not [t for t in threading.enumerate() if t.name in ("fastllm-checkpoint", "fastllm-data-prefetch")]
