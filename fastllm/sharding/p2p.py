"""ZeRO-3 gathers and reduce-scatters through NVLink copy engines instead of NCCL kernels.

NCCL runs a collective as a kernel on the SMs, so the ZeRO-3 traffic that hides behind the GEMMs
also slows them down. On 2 H200s, a ``[8192, 4096] x [4096, 14336]`` bf16 GEMM ran at 686
TFLOP/s alone, 628 beside a stream of NCCL all-gathers and 597 beside NCCL fp32 reduce-scatters,
but 680 beside the same all-gathers done as peer-to-peer ``cudaMemcpyAsync`` (copy engines, no
SMs; 369 GB/s against NCCL's 207 alone). This module moves a part's bytes that way, over PyTorch's
symmetric memory (CUDA backend: every rank maps every other rank's buffers):

* **shadow**: each rank keeps its storage blocks in the compute dtype in one symmetric buffer,
  cast from the masters once per step, behind a barrier so that no rank still reads the old
  values, and read by peers only after a second barrier, once every rank's new values are in place;
* **gather**: a part's compute tensors are filled by copying each rank's block (whole rows, dim 0)
  from that rank's shadow straight into its rows, on a side stream;
* **reduce-scatter**: block ``r`` of each gradient (rows again, in the dtype autograd produced) is
  copied into rank ``r``'s receive buffer, in slot ``[this rank]``; after a barrier each rank sums
  its ``n`` slots in float32 (:func:`fastllm.kernels.sum_rows`) into the reduce dtype. The sum is
  float32 whatever travels: the numerics of NCCL's float32 reduce-scatter of the widened gradients
  (for two ranks, bit for bit), at half the bytes and without the widening pass.

Two receive buffers alternate; a rank pushes part ``k + 2`` into a buffer only after the barrier of
part ``k + 1``, which every rank passes after summing part ``k``: the barriers on the reduce-scatter
stream order every reuse. Used by :class:`~fastllm.sharding.zero3.PartGather` for the parts whose
split leaves all lie in the shadow, filed under that part; everything else keeps NCCL.
"""

from __future__ import annotations

import socket
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from fastllm.kernels.cast import sum_rows
from fastllm.sharding.mesh import Mesh
from fastllm.sharding.overlap import Pending

__all__ = ["CopyEngineTransport", "Shadow", "TRANSPORTS", "copy_engine_unavailable", "shadow_layout"]

TRANSPORTS = ("auto", "nccl", "copy_engine")
_ALIGN = 64  # elements: each block starts 128-byte aligned (bf16) in the symmetric buffers


def copy_engine_unavailable(mesh: Mesh) -> Optional[str]:
    """Why the copy-engine transport cannot serve ``mesh``'s ``data`` axis (``None``: it can).
    Collective over ``data`` (every rank gets the same answer)."""
    if mesh.size("data") == 1:
        return "the data axis has one rank"
    if mesh.backend != "nccl" or mesh.device.type != "cuda":
        return f"it needs CUDA and NCCL (this mesh: {mesh.backend} on {mesh.device.type})"
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError as error:  # pragma: no cover - every CUDA build of torch >= 2.5 has it
        return f"this PyTorch has no symmetric memory ({error})"
    places: list[Any] = [None] * mesh.size("data")
    dist.all_gather_object(places, (socket.gethostname(), mesh.device.index), group=mesh.group("data"))
    hosts = {host for host, _ in places}
    if len(hosts) > 1:
        return f"the data ranks span {len(hosts)} hosts (peer copies need one host)"
    mine = mesh.device.index
    blocked = [d for _, d in places if d != mine and not torch.cuda.can_device_access_peer(mine, d)]
    verdicts: list[Any] = [None] * mesh.size("data")
    dist.all_gather_object(verdicts, (mine, blocked), group=mesh.group("data"))
    pairs = [f"cuda:{a} -> cuda:{b}" for a, bs in verdicts for b in bs]
    if pairs:
        return f"no peer access between {', '.join(pairs)} (GPUs without NVLink/P2P)"
    return None


def _agree(ok: bool, what: str, mesh: Mesh) -> None:
    """Raise on every data rank if ``what`` failed on any (so none waits in a collective alone)."""
    flags: list[Any] = [None] * mesh.size("data")
    dist.all_gather_object(flags, ok, group=mesh.group("data"))
    failed = [rank for rank, flag in enumerate(flags) if not flag]
    if failed:
        raise RuntimeError(f"copy-engine transport: {what} failed on data rank(s) {failed}")


def shadow_layout(blocks: dict[str, tuple[torch.Size, str]]) -> tuple[dict[str, int], dict[str, int], int]:
    """Offsets of each block in the shadow (in the given order), the elements each part spans, and
    the shadow's size: ``blocks`` maps a leaf's path to its block shape and its part."""
    offsets, part_size, total = {}, {}, 0
    for path, (shape, part) in blocks.items():
        offsets[path] = total
        numel = _aligned(torch.Size(shape).numel())
        part_size[part] = part_size.get(part, 0) + numel
        total += numel
    return offsets, part_size, total


def _aligned(numel: int) -> int:
    return -(-numel // _ALIGN) * _ALIGN


def _blocks_of(out: Tensor, layout: list[tuple[int, torch.Size]], keep: Any) -> list[Tensor]:
    """Each block's view of a part's reduced buffer. ``keep`` (the pushed gradients) is referenced by
    the pending result until the caller has waited: the compute stream cannot reuse their memory
    while the side stream still reads it."""
    del keep
    return [out[start:start + torch.Size(shape).numel()].view(shape) for start, shape in layout]


class _EventWork:
    """Makes the current stream wait for an event recorded on a side stream."""

    def __init__(self, event: torch.cuda.Event):
        self.event = event

    def wait(self) -> None:
        torch.cuda.current_stream().wait_event(self.event)


class Shadow:
    """This rank's storage blocks in the compute dtype, in one flat ``buffer`` (symmetric memory
    under the transport; any tensor in tests), laid out by :func:`shadow_layout`.

    Its :attr:`views` are autograd leaves that require grad, made once: the ZeRO-3 gathers and the
    token lookup take their blocks from them, and their gradients go to the step's gradient sink,
    never through autograd, so no per-step cast node is needed (291 custom-function calls per
    Llama-8B step cost ~7 ms of host time while the GPU waited).
    """

    def __init__(self, blocks: dict[str, tuple[torch.Size, str]], buffer: Tensor):
        self.blocks = dict(blocks)
        self.offsets, self.part_size, total = shadow_layout(self.blocks)
        if buffer.ndim != 1 or buffer.numel() < total:
            raise ValueError(f"the shadow needs a flat buffer of {total} elements, got {tuple(buffer.shape)}")
        self.buffer = buffer
        self.views = {path: self.block(path).requires_grad_(True) for path in self.blocks}

    def block(self, path: str) -> Tensor:
        """The block of ``path`` in the buffer: a plain view (no autograd)."""
        shape, _ = self.blocks[path]
        offset = self.offsets[path]
        return self.buffer.detach()[offset:offset + torch.Size(shape).numel()].view(shape)

    def holds(self, paths: list[str], tensors: tuple[Tensor, ...]) -> bool:
        """Whether ``tensors`` are this shadow's blocks of ``paths``."""
        base, size = self.buffer.data_ptr(), self.buffer.element_size()
        return all(p in self.offsets and t.dtype == self.buffer.dtype and
                   t.data_ptr() == base + self.offsets[p] * size for p, t in zip(paths, tensors))

    def write(self, masters: dict[str, Tensor]) -> None:
        """The masters (path -> block, any float dtype) rounded into their blocks."""
        with torch.no_grad():
            for path, m in masters.items():
                self.block(path).copy_(m)


class CopyEngineTransport:
    """The symmetric buffers of one model's split leaves on one ``data`` group (building it is a
    collective over ``data``).

    ``blocks`` maps each leaf's path to its storage block shape and its part (``layers.3``); the
    leaves are split over ``data`` along dim 0 (whole rows) and their compute dtype is ``dtype``.
    """

    def __init__(self, mesh: Mesh, blocks: dict[str, tuple[torch.Size, str]], dtype: torch.dtype):
        import torch.distributed._symmetric_memory as symm_mem

        self.mesh, self.dtype, self.blocks = mesh, dtype, dict(blocks)
        self.n, self.me = mesh.size("data"), mesh.rank("data")
        _, self.part_size, total = shadow_layout(self.blocks)
        group = mesh.group("data").group_name
        device = mesh.device
        width = max(self.part_size.values())
        buffer = receive = error = None
        try:  # both buffers or neither, agreed by every rank before the collective rendezvous
            buffer = symm_mem.empty(total, dtype=dtype, device=device)
            receive = symm_mem.empty(2 * self.n * width, dtype=dtype, device=device)
        except RuntimeError as caught:  # out of memory, no symmetric-memory backend, ...
            error = caught
        gib = (total + 2 * self.n * width) * dtype.itemsize / 2**30
        _agree(error is None, f"allocating {gib:.1f} GiB of symmetric memory ({error})", mesh)
        self.shadow_handle = symm_mem.rendezvous(buffer, group)
        self.receive_handle = symm_mem.rendezvous(receive, group)
        self.shadow = Shadow(self.blocks, buffer)
        self.offsets = self.shadow.offsets
        self.part_start: dict[str, int] = {}  # a part's leaves are consecutive in the shadow
        for path, (_, part) in self.blocks.items():
            self.part_start.setdefault(part, self.offsets[path])
        self.receive = receive  # our receive buffer: the handle maps it, this keeps it allocated
        # Every rank's buffers, mapped here: [rank] -> flat shadow / [2, n, width] receive slots.
        self.peer_shadow = [self.shadow_handle.get_buffer(r, (total,), dtype) for r in range(self.n)]
        self.peer_receive = [self.receive_handle.get_buffer(r, (2, self.n, width), dtype) for r in range(self.n)]
        self.gather_stream = torch.cuda.Stream(device=device)
        self.scatter_stream = torch.cuda.Stream(device=device)
        self._slot = 0

    def matches(self, blocks: dict[str, tuple[torch.Size, str]], dtype: torch.dtype) -> bool:
        return dtype == self.dtype and blocks == self.blocks

    # --- the shadow ---
    def fill(self, masters: dict[str, Tensor], *, write: bool = True) -> dict[str, Tensor]:
        """The shadow's blocks for these masters (``path -> storage block``, any float dtype), cast
        into it when ``write`` (``False``: a later micro-batch of the same step, the values are there)."""
        if write:
            self.barrier()  # nobody reads the old values (each rank waited for its gathers)
            self.shadow.write(masters)
            self.barrier()  # every rank's new values are in place before anyone gathers
        return {path: self.shadow.views[path] for path in masters}

    def barrier(self) -> None:
        """Every rank of ``data`` reaches this point of its compute stream (a symmetric-memory barrier)."""
        self.shadow_handle.barrier(channel=0)

    def holds(self, paths: list[str], blocks: tuple[Tensor, ...]) -> bool:
        """Whether these are the shadow's blocks of these leaves (the part was filled here)."""
        return self.shadow.holds(paths, blocks)

    # --- collectives of one part ---
    def gather(self, paths: list[str], shapes: list[torch.Size]) -> Pending:
        """Start filling the compute tensors of these leaves (``shapes``: their blocks' shapes) from
        every rank's shadow; the result is their list, each as ``[ranks, block numel]`` rows (what
        an all-gather returns; a view of the compute tensor)."""
        compute = torch.cuda.current_stream()
        outs = [torch.empty((self.n * s[0], *s[1:]), dtype=self.dtype, device=self.mesh.device) for s in shapes]
        self.gather_stream.wait_stream(compute)  # the outputs' memory is free (stream order)
        with torch.cuda.stream(self.gather_stream):
            for path, out in zip(paths, outs):
                rows, numel = out.view(self.n, -1), out.numel() // self.n
                start = self.offsets[path]
                for step in range(self.n):
                    r = (self.me + step) % self.n  # each rank starts at its own block: links spread
                    rows[r].copy_(self.peer_shadow[r][start:start + numel])
            event = torch.cuda.Event()
            event.record(self.gather_stream)
        return Pending(_EventWork(event), lambda: [out.view(self.n, -1) for out in outs])

    def reduce_scatter(self, paths: list[str], grads: tuple[Tensor, ...], reduce_dtype: torch.dtype) -> Pending:
        """Start summing these gradients (compute tensors) over ``data``; the result is the list of
        this rank's blocks in ``reduce_dtype``."""
        compute = torch.cuda.current_stream()
        part = self.blocks[paths[0]][1]
        slot, self._slot = self._slot, 1 - self._slot
        # each block lands where it lies in the shadow, relative to its part's first block
        layout = [(self.offsets[path] - self.part_start[part], self.blocks[path][0]) for path in paths]
        width = self.part_size[part]
        out = torch.empty(width, dtype=reduce_dtype, device=self.mesh.device)
        grads = tuple(g.to(self.dtype, memory_format=torch.contiguous_format) for g in grads)
        self.scatter_stream.wait_stream(compute)
        with torch.cuda.stream(self.scatter_stream):
            for (start, shape), g in zip(layout, grads):
                rows, numel = g.view(self.n, -1), g.numel() // self.n
                for step in range(1, self.n + 1):
                    r = (self.me + step) % self.n  # to the others first, this rank's own block last
                    self.peer_receive[r][slot, self.me, start:start + numel].copy_(rows[r])
            self.receive_handle.barrier(channel=0)  # every rank's blocks have landed here
            sum_rows(self.peer_receive[self.me][slot, :, :width], reduce_dtype, out=out)
            event = torch.cuda.Event()
            event.record(self.scatter_stream)
        return Pending(_EventWork(event), lambda: _blocks_of(out, layout, keep=grads))
