"""A device mesh with the named axes ``pipe``, ``data`` and ``tensor`` over torch.distributed.

The world's ranks are laid out on a 3-D grid ``[pipe, data, tensor]`` in row-major order, so
``tensor`` varies fastest, then ``data``, then ``pipe`` (Megatron-LM's convention: the ranks of one
tensor-parallel group are neighbours, i.e. GPUs of one node joined by NVLink)::

    rank = (pipe_index * data_size + data_index) * tensor_size + tensor_index

Each axis of size > 1 gets one process group per line of the grid along it; every rank creates all
of them in the same order (``torch.distributed.new_group`` is collective) and keeps the one that
contains it. Axes of size 1 have no group: collectives over them are the identity, which is what
lets the same code run in one process on a laptop.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["AXES", "Mesh", "init_from_env"]

# Slowest to fastest varying: the order of the rank grid.
AXES: tuple[str, ...] = ("pipe", "data", "tensor")


def _fill_sizes(sizes: dict[str, int | None], world_size: int, hint: str = "") -> dict[str, int]:
    """Replace the one ``-1``/``None`` size by what the others leave of ``world_size``."""
    rest = [axis for axis, size in sizes.items() if size is None or size == -1]
    if len(rest) > 1:
        raise ValueError(f"only one mesh axis may be -1/None ('the rest'), got {rest}")
    for axis, size in sizes.items():
        if axis not in rest and (not isinstance(size, int) or size < 1):
            raise ValueError(f"mesh axis {axis!r} needs a size >= 1 (or -1 for the rest), got {size!r}")
    known = math.prod(size for axis, size in sizes.items() if axis not in rest)
    if rest:
        if world_size % known:
            raise ValueError(
                f"mesh axes {_fmt(sizes)} cannot fill the world of {world_size} ranks: "
                f"{world_size} is not divisible by {known}"
            )
        sizes = {**sizes, rest[0]: world_size // known}
    if math.prod(sizes.values()) != world_size:
        raise ValueError(
            f"mesh axes {_fmt(sizes)} multiply to {math.prod(sizes.values())} ranks but the world has "
            f"{world_size}; give sizes whose product is {world_size} or one axis of -1{hint}"
        )
    return sizes


def _fmt(sizes: dict) -> str:
    return " x ".join(f"{axis}={sizes[axis]}" for axis in AXES)


class Mesh:
    """Named axes over the ranks of torch.distributed (or one process, when the world is 1).

    Build one with :meth:`from_env` under torchrun, ``Mesh(data=..., tensor=..., pipe=...)`` over an
    already initialised process group (or a world of 1), or :meth:`abstract` for planning: sizes and
    coordinates only, no process groups (resolving specs, slicing shards, memory tables).
    """

    def __init__(self, *, data: int | None = 1, tensor: int | None = 1, pipe: int | None = 1,
                 device: torch.device | str | None = None):
        """``device``: where a world of one process computes (default CPU); under a process group
        the backend decides (NCCL: this rank's CUDA device, gloo: CPU)."""
        initialised = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if initialised else 1
        rank = dist.get_rank() if initialised else 0
        hint = "" if initialised else (
            " (torch.distributed is not initialised: use Mesh.from_env under torchrun, or"
            " Mesh.abstract for a plan without processes)"
        )
        self._setup(dict(pipe=pipe, data=data, tensor=tensor), world_size, rank, hint)
        self.is_abstract = False
        self.backend = dist.get_backend() if initialised else None
        self.device = _device(self.backend) if initialised or device is None else torch.device(device)
        self._groups = _make_groups(self.shape) if initialised else {axis: None for axis in AXES}

    def _setup(self, sizes: dict, world_size: int, rank: int, hint: str = "") -> None:
        filled = _fill_sizes(sizes, world_size, hint)
        self.shape: dict[str, int] = {axis: filled[axis] for axis in AXES}
        self.world_size = world_size
        self.global_rank = rank
        self.coords: dict[str, int] = self.coords_of(rank)

    @classmethod
    def abstract(
        cls, *, data: int = 1, tensor: int = 1, pipe: int = 1, rank: int = 0
    ) -> "Mesh":
        """A mesh of sizes only, seen from ``rank``: no process groups, no collectives."""
        sizes = dict(pipe=pipe, data=data, tensor=tensor)
        if any(not isinstance(size, int) or size < 1 for size in sizes.values()):
            raise ValueError(f"an abstract mesh needs every size >= 1, got {sizes}")
        mesh = cls.__new__(cls)
        world_size = data * tensor * pipe
        if not 0 <= rank < max(world_size, 1):
            raise ValueError(f"rank {rank} is outside an abstract mesh of {world_size} ranks")
        mesh._setup(sizes, world_size, rank)
        mesh.is_abstract, mesh.backend, mesh.device = True, None, torch.device("cpu")
        mesh._groups = {axis: None for axis in AXES}
        return mesh

    @classmethod
    def local(cls, device: torch.device | str = "cpu") -> "Mesh":
        """This process alone, whatever the world around it: a mesh of one on ``device`` (e.g. a
        one-process reference computed inside each rank of a distributed test)."""
        mesh = cls.__new__(cls)
        mesh._setup(dict(pipe=1, data=1, tensor=1), 1, 0)
        mesh.is_abstract, mesh.backend, mesh.device = False, None, torch.device(device)
        mesh._groups = {axis: None for axis in AXES}
        return mesh

    @classmethod
    def from_env(
        cls,
        *,
        data: int | None = -1,
        tensor: int | None = 1,
        pipe: int | None = 1,
        backend: str | None = None,
        timeout_s: float = 600.0,
        device: torch.device | str | None = None,
    ) -> "Mesh":
        """Initialise torch.distributed from torchrun's variables (``RANK``, ``WORLD_SIZE``,
        ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and build the mesh.

        Without those variables (a plain ``python train.py``) the world is one process and no
        process group is created. ``backend`` defaults to NCCL when CUDA is available, else gloo.
        """
        init_from_env(backend, timeout_s)
        return cls(data=data, tensor=tensor, pipe=pipe, device=device)

    # --- coordinates ------------------------------------------------------------------------
    def coords_of(self, rank: int) -> dict[str, int]:
        """The grid coordinates of a global rank (``tensor`` fastest)."""
        coords = {}
        for axis in reversed(AXES):
            rank, coords[axis] = divmod(rank, self.shape[axis])
        return {axis: coords[axis] for axis in AXES}

    def rank_of(self, coords: dict[str, int]) -> int:
        """The global rank at grid coordinates (missing axes count as 0)."""
        rank = 0
        for axis in AXES:
            rank = rank * self.shape[axis] + coords.get(axis, 0)
        return rank

    def size(self, axis: str | tuple[str, ...]) -> int:
        """Number of ranks along an axis (or the product over a tuple of axes)."""
        if isinstance(axis, tuple):  # a loop, not math.prod of a generator: dynamo traces it inside a layout
            size = 1
            for a in axis:
                size *= self.size(a)
            return size
        return self.shape[_check_axis(axis)]

    def rank(self, axis: str | tuple[str, ...]) -> int:
        """This rank's coordinate along an axis; over a tuple of axes, the first is the major one."""
        if isinstance(axis, tuple):
            index = 0
            for a in axis:
                index = index * self.size(a) + self.rank(a)
            return index
        return self.coords[_check_axis(axis)]

    def ranks(self, axis: str) -> list[int]:
        """Global ranks of this rank's group along ``axis``, in group-rank order."""
        _check_axis(axis)
        return [self.rank_of({**self.coords, axis: i}) for i in range(self.shape[axis])]

    def group(self, axis: str) -> dist.ProcessGroup | None:
        """The process group along ``axis`` that holds this rank; ``None`` for an axis of size 1."""
        if self.is_abstract and self.shape[_check_axis(axis)] > 1:
            raise RuntimeError(f"an abstract mesh has no process groups (asked for axis {axis!r})")
        return self._groups[_check_axis(axis)]

    def __repr__(self) -> str:
        kind = "abstract " if self.is_abstract else ""
        return f"Mesh({kind}{_fmt(self.shape)}, rank={self.global_rank}, coords={self.coords})"


def init_from_env(backend: str | None = None, timeout_s: float = 600.0) -> bool:
    """Initialise torch.distributed from torchrun's variables when they describe a world of more
    than one process and nobody did yet; True when this call did (and so owns the group).
    ``backend`` defaults to NCCL when CUDA is available, else gloo; ``timeout_s`` bounds every
    collective's wait for a peer."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    return True


def _check_axis(axis: str) -> str:
    if axis not in AXES:
        raise ValueError(f"unknown mesh axis {axis!r}; the mesh axes are {AXES}")
    return axis


def _device(backend: str | None) -> torch.device:
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _make_groups(shape: dict[str, int]) -> dict[str, dist.ProcessGroup | None]:
    """One group per grid line along each axis, created in the same order on every rank."""
    world_size, rank = dist.get_world_size(), dist.get_rank()
    helper = Mesh.abstract(**shape)
    groups: dict[str, dist.ProcessGroup | None] = {axis: None for axis in AXES}
    for axis in reversed(AXES):  # tensor, data, pipe: a fixed order every rank follows
        if shape[axis] == 1:
            continue
        if shape[axis] == world_size:
            groups[axis] = dist.group.WORLD
            continue
        for line in _lines(helper, axis):
            group = dist.new_group(line)
            if rank in line:
                groups[axis] = group
    return groups


def _lines(mesh: Mesh, axis: str) -> list[list[int]]:
    """All groups along ``axis``: ranks that share every other coordinate, in rank order."""
    starts = [mesh.coords_of(r) for r in range(mesh.world_size) if mesh.coords_of(r)[axis] == 0]
    return [[mesh.rank_of({**start, axis: i}) for i in range(mesh.shape[axis])] for start in starts]
