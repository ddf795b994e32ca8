"""Checks of compiled blocks (fastllm/train/compile.py) against eager; run by test_compile_blocks.py in
a subprocess with FASTLLM_TYPECHECK=0 (dynamo cannot trace the beartype checks):
``python compile_checks.py single|fp8|packed|batches|distributed``.

Backend ``aot_eager``: dynamo's capture and AOTAutograd's forward/backward graphs (the parts our
code shapes) in seconds; inductor's codegen is torch's to test. ``main`` prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from torch._dynamo.utils import counters

from fastllm import models, optim, random, tree
from fastllm.sharding import COMPUTE_RULES, Mesh, Partitioner, testing
from fastllm.train.step import TrainStep

BACKEND = "aot_eager"
TOLERANCE = dict(atol=1e-6, rtol=1e-6)
SEQ, BATCH = 16, 4


def batch(config, seed: int = 0) -> dict:
    """Tokens, targets with ignored positions and two packed documents a row (segment ids)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (BATCH, SEQ + 1), generator=gen)
    targets = tokens[:, 1:].clone()
    targets[torch.rand(targets.shape, generator=gen) < 0.2] = -100
    boundary = torch.randint(1, SEQ, (BATCH, 1), generator=gen)
    return {"tokens": tokens[:, :-1].contiguous(), "targets": targets,
            "segment_ids": (torch.arange(SEQ)[None, :] >= boundary).long()}


def assert_trees_close(actual, expected, what: str) -> None:
    expected = tree.flatten(expected)
    for path, value in tree.flatten(actual).items():
        torch.testing.assert_close(value, expected[path], **TOLERANCE, msg=lambda m: f"{what} {path}: {m}")


def graph_counts() -> dict:
    return {"graph_breaks": sum(counters["graph_break"].values()),
            "unique_graphs": counters["stats"]["unique_graphs"]}


def _gradients(config, mesh: Mesh, compile: bool, remat: bool, **partitioner_options):
    """(gradients, loss) of one step's backward with grad_accum=2, this data rank's rows."""
    partitioner = Partitioner(mesh, bucket_bytes=64 << 10, **partitioner_options)
    step = TrainStep(models.model(config), partitioner, optim.adamw(1e-3, weight_decay=0.1), grad_accum=2,
                     remat=remat, compile=compile, compile_backend=BACKEND)
    n, me = mesh.size("data"), mesh.rank("data")
    rows = {name: value.chunk(n)[me] for name, value in batch(config, seed=1).items()}
    grads, loss, _ = step.gradients(step.init_state(random.key(3)), rows)
    return grads, loss


def single_device() -> dict:
    """tiny-llama (2 layers): loss and gradients of compiled blocks equal eager, with and without
    remat; one dynamo graph serves both layers, no graph break; a compiled train step updates the
    params as the eager one does."""
    config = models.preset("tiny-llama")
    counters.clear()
    for remat in (False, True):
        eager = _gradients(config, Mesh.local(), False, remat)
        compiled = _gradients(config, Mesh.local(), True, remat)
        torch.testing.assert_close(compiled[1], eager[1], **TOLERANCE)
        assert_trees_close(compiled[0], eager[0], f"gradient (remat={remat})")
    counts = graph_counts()  # the checkpointed block reuses the graph too (dynamo caches per code object)
    assert counts == {"graph_breaks": 0, "unique_graphs": 1}, counts
    opt = optim.adamw(1e-3, weight_decay=0.1)
    states = {}
    for compile in (False, True):
        step = TrainStep(models.model(config), Partitioner(Mesh.local()), opt, grad_accum=2, max_grad_norm=1.0,
                         compile=compile, compile_backend=BACKEND)
        state, metrics = step(step.init_state(random.key(1)), batch(config))
        states[compile] = (state.params, metrics["loss"])
    torch.testing.assert_close(states[True][1], states[False][1], **TOLERANCE)
    assert_trees_close(states[True][0], states[False][0], "params after a compiled step")
    return "ok"


def fp8_single() -> dict:
    """tiny-llama with FP8 projections (``kernels.matmul="fp8"``): compiled blocks give eager's loss
    and gradients, the FP8 autograd function traced into the block's one graph."""
    from fastllm.kernels import KernelConfig

    config = models.preset("tiny-llama", kernels=KernelConfig(matmul="fp8"))
    eager = _gradients(config, Mesh.local(), False, False)
    counters.clear()
    compiled = _gradients(config, Mesh.local(), True, False)
    torch.testing.assert_close(compiled[1], eager[1], **TOLERANCE)
    assert_trees_close(compiled[0], eager[0], "fp8 gradient")
    return graph_counts()


def distributed_rank() -> dict:
    """On 2 gloo ranks, compiled blocks under remat and grad_accum=2 give the eager gradients:
    data=2 at ZeRO-3 (gathers and prefetch stay eager around the compiled block), tensor=2 with
    sequence parallelism (the collectives run eagerly between compiled pieces: graph breaks) and
    pipe=2 under 1F1B (each stage compiles its own block; sends and receives stay outside)."""
    config = models.preset("tiny-llama")
    report = {}
    for name, sizes, options in (("data2_zero3", dict(data=2), dict(zero_stage=3)),
                                 ("tensor2_sp", dict(tensor=2), dict(rules=COMPUTE_RULES.replace("seq", "tensor"))),
                                 ("pipe2", dict(pipe=2), {})):
        mesh = Mesh(**{"data": 1, "tensor": 1, **sizes})
        eager_grads, eager_loss = _gradients(config, mesh, False, True, **options)
        counters.clear()
        grads, loss = _gradients(config, mesh, True, True, **options)
        torch.testing.assert_close(loss, eager_loss, **TOLERANCE)
        assert_trees_close(grads, eager_grads, f"{name} gradient")
        report[name] = graph_counts()
    return report


def _flex_model():
    """tiny-llama on FlexAttention (packed documents' masks), its parts and params."""
    from fastllm.kernels import KernelConfig

    config = models.preset("tiny-llama", kernels=KernelConfig().replace(attention="triton"))
    return config, models.model(config), models.init(config, random.key(0))


def packed_graphs() -> dict:
    """Graphs of one compiled block of packed documents: the compiled part builds FlexAttention's
    block masks before the graph (no mask is built while dynamo traces), which reads them as
    inputs. Its output equals eager's. The forward alone: FlexAttention has no CPU backward."""
    import importlib

    from fastllm import nn
    from fastllm.train.compile import CompiledParts

    attention = importlib.import_module("fastllm.kernels.attention")
    built, build = [], attention._segment_block_mask

    def spy(*args, **kwargs):
        built.append(torch.compiler.is_compiling())
        return build(*args, **kwargs)

    attention._segment_block_mask = spy
    config, model, params = _flex_model()
    data = batch(config)
    embed, block = model.parts[0], model.parts[1]
    counters.clear()
    with torch.no_grad():
        carry = embed.fn(embed.static, nn.model.part_params(embed, params), {}, data, None)
        block_params = nn.model.part_params(block, params)
        compiled = CompiledParts(BACKEND)(block)(block.static, block_params, carry, data, None)
        counts = graph_counts()
        eager = block.fn(block.static, block_params, carry, data, None)
    torch.testing.assert_close(compiled["h"], eager["h"], **TOLERANCE)
    assert built and not any(built), f"a block mask was built while dynamo traced: {built}"
    assert not attention._PREPARED, "prepared block masks outlive the compiled call"
    return counts


def packed_batches() -> dict:
    """The model's blocks compiled, over four batches of different documents, equal eager on each:
    through the compiled parts (masks prepared) and through a plain ``torch.compile`` of each block
    (no preparation: the mask is built in the graph), with dynamo resuming in nested frames where
    the torch version can. The Python cache of masks, traced there, handed a later batch an earlier
    batch's mask (every other batch off by 0.12)."""
    import contextlib

    from fastllm import nn
    from fastllm.train.compile import CompiledParts

    config, model, params = _flex_model()
    compiled_parts = CompiledParts(BACKEND)
    plain = {}
    runners = {"compiled_parts": compiled_parts,
               "plain_compile": lambda part: plain.setdefault(
                   part.static, torch.compile(part.fn, backend=BACKEND, dynamic=False))}
    nested = (torch._dynamo.config.patch(nested_graph_breaks=True)
              if hasattr(torch._dynamo.config, "nested_graph_breaks") else contextlib.nullcontext())
    def blocks(runner, data):
        carry = {}
        for part in model.parts[:-1]:
            fn = part.fn if runner is None or part.layer is None else runner(part)
            carry = fn(part.static, nn.model.part_params(part, params), carry, data, None)
        return carry["h"]

    worst = {}
    with torch.no_grad(), nested:
        for name, runner in runners.items():
            for seed in range(4):
                data = batch(config, seed=seed)
                compiled = blocks(runner, data)
                error = (compiled - blocks(None, data)).abs().max().item()
                worst[name] = max(worst.get(name, 0.0), error)
    return {name: value <= TOLERANCE["atol"] for name, value in worst.items()}


def main(part: str) -> None:
    """Print ``{"result": ..., "seconds": ...}`` of ``part``: "single", "fp8", "packed", "batches" or
    "distributed" (2 ranks)."""
    started = time.perf_counter()
    parts = {"single": single_device, "fp8": fp8_single, "packed": packed_graphs, "batches": packed_batches,
             "distributed": lambda: testing.run(distributed_rank, 2, timeout_s=240.0)}
    result = parts[part]()
    print(json.dumps({"result": result, "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main(sys.argv[1])
