"""The fused loss on two vocab shards (gloo, CPU) equals the unsharded loss; dh partials sum up.

The same two processes also run the LM head + loss as a model calls it
(``nn.ops.linear_cross_entropy`` under a tensor-parallel layout): the layout moves the hidden
states into the operation and completes dh in backward.
"""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastllm import nn
from fastllm.kernels import VocabShard, fused_linear_cross_entropy
from fastllm.sharding import COMPUTE_RULES, MeshLayout
from fastllm.sharding.mesh import Mesh
from helpers import check


def _inputs():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 8, generator=gen)
    weight = torch.randn(30, 8, generator=gen)
    targets = torch.randint(0, 30, (2, 5), generator=gen)
    targets[0, 0] = -100
    return hidden, weight, targets


def _worker(rank, world, init_file, impl, queue):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    hidden, weight, targets = _inputs()
    size = weight.shape[0] // world
    shard = VocabShard(start=rank * size, size=weight.shape[0])
    h = hidden.clone().requires_grad_()
    w = weight[rank * size:(rank + 1) * size].clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, targets, z_loss=1e-2, label_smoothing=0.1, chunk_size=4,
                                      shard=shard, impl=impl)
    loss.backward()
    # the planted bug: each shard believing it starts one row later (targets picked off by one)
    late = fused_linear_cross_entropy(hidden, weight[rank * size:(rank + 1) * size], targets, z_loss=1e-2,
                                      label_smoothing=0.1, chunk_size=4, impl=impl,
                                      shard=VocabShard(start=rank * size + 1, size=weight.shape[0]))
    queue.put((rank, loss.item(), h.grad.numpy(), w.grad.numpy(), late.item(), *_layout_loss(rank, size, impl)))
    dist.destroy_process_group()


def _layout_loss(rank, size, impl):
    """(loss, valid weight, full dh) of the head + loss operation on this rank's vocab block."""
    hidden, weight, targets = _inputs()
    h = hidden.clone().requires_grad_()
    w = weight[rank * size:(rank + 1) * size].clone().requires_grad_()
    layout = MeshLayout(Mesh(tensor=2), COMPUTE_RULES)
    loss, valid = nn.ops.linear_cross_entropy(layout, h, nn.ops.STREAM, w, ("vocab", "embed"), targets, _loss_mask(),
                                              impl=impl)
    loss.backward()
    return loss.item(), valid.item(), h.grad.numpy()  # by value: we exit next


def _loss_mask():
    return torch.arange(10).reshape(2, 5) % 3 != 1


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_two_vocab_shards_equal_one(impl):
    """Each rank computes in fp32; the reference is the unsharded loss in float64."""
    hidden, weight, targets = _inputs()
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    want = fused_linear_cross_entropy(h, w, targets, z_loss=1e-2, label_smoothing=0.1, impl="torch")
    want.backward()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_worker, args=(r, 2, os.path.join(tmp, "init"), impl, queue))
                 for r in range(2)]
        for p in procs:
            p.start()
        results = sorted((queue.get(timeout=120) for _ in procs), key=lambda r: r[0])
        for p in procs:
            p.join(timeout=60)
    for rank, loss, _, _, late, *_ in results:
        check(torch.tensor(loss), want, what=f"loss on rank {rank}")
        with pytest.raises(AssertionError, match="not close"):  # the planted bug is caught
            check(torch.tensor(late), want, what=f"loss of the late shard on rank {rank}")
    (_, _, dh0, dw0, *_), (_, _, dh1, dw1, *_) = results
    check(torch.from_numpy(dh0 + dh1), h.grad, what="dh")  # dh: a partial sum per shard
    check(torch.cat([torch.from_numpy(dw0), torch.from_numpy(dw1)]), w.grad, what="dW")

    h = hidden.double().requires_grad_()
    want, want_valid = nn.cross_entropy(h @ weight.double().T, targets, loss_mask=_loss_mask())
    want.backward()
    for rank, *_, loss, valid, dh in results:
        check(torch.tensor(loss), want, what=f"layout loss on rank {rank}")
        assert valid == want_valid.item()
        check(torch.from_numpy(dh), h.grad, what=f"layout dh on rank {rank}")  # complete on every rank
