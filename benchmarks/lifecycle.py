"""What the training lifecycle costs a step: checkpoints (blocking or asynchronous) and the ranks'
per-step agreement on stop signals and the checkpoint clock.

    python benchmarks/lifecycle.py checkpoint                         # one process, CPU
    torchrun --nproc-per-node 2 benchmarks/lifecycle.py control       # 2 gloo ranks

``checkpoint``: the Trainer on synthetic batches (a Llama of ~17M parameters: 200 MB of params and
AdamW moments), timed per step over ``--steps`` steps without checkpoints, with a blocking one and
with an asynchronous one every ``--every`` steps. Prints the mean step time of each and what a
checkpoint adds to the step it happens in, averaged over the run (the asynchronous writer's
thread competes with training for the same cores, which is counted too).

``control``: ``StepControl.after_step`` per call against a blocking MAX all-reduce of the same
flags, between steps of ``--work-ms`` of matmul on every rank. One JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from fastllm import models, nn
from fastllm.data import DataConfig
from fastllm.train.config import Config, ModelSection, OptimSection, RunConfig, TrainSection

SEQ, BATCH = 64, 4


class Batches:
    """Synthetic token batches, resumable like the real loader."""

    def __init__(self, vocab: int):
        self.vocab, self.step = vocab, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        gen = torch.Generator().manual_seed(self.step)
        self.step += 1
        tokens = torch.randint(0, self.vocab, (BATCH, SEQ + 1), generator=gen)
        return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def _config(run_dir: str, steps: int, every: int, asynchronous: bool) -> Config:
    return Config(
        run=RunConfig(dir=run_dir, progress="off", device="cpu"),
        model=ModelSection(preset="tiny-llama", vocab_size=8192, embed_dim=512, n_layers=4, n_heads=8, n_kv_heads=4,
                           mlp_dim=1536, max_seq_len=SEQ),
        data=DataConfig(seq_len=SEQ),
        train=TrainSection(steps=steps, batch_size=BATCH, log_every=steps, checkpoint_every=every,
                           checkpoint_minutes=0.0, async_checkpoint=asynchronous, keep_checkpoints=1),
        optim=OptimSection(lr=1e-3),
    )


def _step_times(steps: int, every: int, asynchronous: bool) -> list[float]:
    """Wall time of each step, the checkpoint it may save included."""
    from fastllm.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as run_dir:
        config = _config(run_dir, steps, every, asynchronous)
        trainer = Trainer(config, train_data=Batches(8192))
        times, step, last = [], trainer.train_step, [time.perf_counter()]

        def timed(state, batch):
            out = step(state, batch)
            now = time.perf_counter()
            times.append(now - last[0])  # since the previous step ended: its save included
            last[0] = now
            return out

        trainer.train_step = timed
        timed.init_state, timed.plan = step.init_state, step.plan
        trainer.run()
    return times[2:]  # the first steps warm up


def checkpoint(args) -> None:
    params = nn.count(models.model(_config(".", 1, 0, False).model_config).declarations)
    for name, every, asynchronous in (("none", 0, False), ("blocking", args.every, False),
                                      ("async", args.every, True)):
        times = _step_times(args.steps, every, asynchronous)
        print(json.dumps({"checkpoints": name, "params": params, "steps": len(times),
                          "mean_step_s": round(statistics.mean(times), 4),
                          "median_step_s": round(statistics.median(times), 4)}), flush=True)


def control(args) -> None:
    import torch.distributed as dist

    from fastllm.train.control import StepControl, control_group

    dist.init_process_group("gloo")
    group = control_group(dist.get_world_size())
    signals = type("Flags", (), {"received": 0})()
    side = int((args.work_ms / 1000 * 2e9 / 2) ** (1 / 3)) or 1  # about work_ms of matmul at ~2 GFLOP/s

    def work():
        torch.randn(side, side) @ torch.randn(side, side)

    def loop(after) -> float:
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.calls):
            work()
            after()
        return (time.perf_counter() - start) / args.calls

    def blocking():
        flags = torch.tensor([signals.received, 0])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)

    control = StepControl(group, signals, checkpoint_s=600.0)
    results = {"nothing": loop(lambda: None), "step_control": loop(control.after_step),
               "blocking_all_reduce": loop(blocking)}
    control.close()
    if dist.get_rank() == 0:
        base = results["nothing"]
        for name, seconds in results.items():
            print(json.dumps({"per_step": name, "ms": round(seconds * 1e3, 3),
                              "over_nothing_ms": round((seconds - base) * 1e3, 3)}), flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    ck = sub.add_parser("checkpoint")
    ck.add_argument("--steps", type=int, default=42)
    ck.add_argument("--every", type=int, default=5)
    ctl = sub.add_parser("control")
    ctl.add_argument("--calls", type=int, default=500)
    ctl.add_argument("--work-ms", type=float, default=5.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    checkpoint(args) if args.what == "checkpoint" else control(args)


if __name__ == "__main__":
    main()
