"""Grouped matmul over experts: rows sorted by expert, each group times its own weight, no padding.

    y[rows of g] = x[rows of g] @ w[g]^T        x: [rows, in], w: [groups, out, in] (torch layout)
    dx[rows of g] = dy[rows of g] @ w[g]         (the same kernel, w read transposed via strides)
    dw[g] = dy[rows of g]^T @ x[rows of g]       (one program per (group, out tile, in tile))

Groups are contiguous row ranges given by ``offsets`` ([groups + 1], a cumulative count on the
device). The forward grid is an upper bound on row tiles, ``cdiv(rows, BLOCK_M) + groups``; each
program finds its group by counting cumulative tile offsets <= its id (one vector compare), and
programs past the last tile exit. So the launch needs no host sync and computes no padded capacity
(MegaBlocks, Gale et al. 2023, makes the same point with block-sparse kernels).

On Hopper, for bf16, PyTorch's ``torch._grouped_mm`` (CUTLASS, the same contract: contiguous groups,
cumulative ends, no padding, no host sync) is faster than this kernel: at Mixtral's
``32768 rows x 4096 -> 14336`` over 8 experts, 638 against 500 TFLOP/s forward and 627 against 469
backward on an H100 (docs/performance.md, kernel table). There ``impl="triton"`` takes it;
elsewhere (other GPUs, other dtypes, a torch without it) the Triton kernel runs.
"""

import functools

import torch
from jaxtyping import Float, Int
from torch import Tensor

from fastllm.kernels import _triton
from fastllm.kernels._triton import tl
from fastllm.kernels.registry import Choice, resolve

__all__ = ["grouped_matmul", "grouped_matmul_reference", "vendor_grouped_matmul"]


def grouped_matmul_reference(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    bounds = offsets.tolist()
    parts = [x[bounds[g]:bounds[g + 1]] @ w[g].t() for g in range(w.shape[0])]
    return torch.cat(parts, dim=0) if parts else x.new_zeros(0, w.shape[1])


@_triton.jit
def _grouped_mm(X, W, Y, OFFSETS, TILES, n_groups, N, K, stride_xm, stride_wg, stride_wn, stride_wk,
                stride_ym, n_row_tiles, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr, SWIZZLE: tl.constexpr,
                PRECISION: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    # L2-friendly order: SWIZZLE row tiles sweep every column tile before the next rows start, so
    # their x tiles stay in L2 while w streams (the grouped ordering of Triton's matmul tutorial)
    program = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    band = program // (SWIZZLE * tiles_n)
    band_rows = tl.minimum(n_row_tiles - band * SWIZZLE, SWIZZLE)
    tile = band * SWIZZLE + (program % (SWIZZLE * tiles_n)) % band_rows
    col_tile = (program % (SWIZZLE * tiles_n)) // band_rows
    if tile >= tl.load(TILES + n_groups):
        return
    groups = tl.arange(0, BLOCK_G)
    starts = tl.load(TILES + groups, mask=groups < n_groups, other=2147483647)
    group = tl.sum((starts <= tile).to(tl.int32), axis=0) - 1
    first_row = tl.load(OFFSETS + group) + (tile - tl.load(TILES + group)) * BLOCK_M
    rows = (first_row + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < tl.load(OFFSETS + group + 1)
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w_group = W + group.to(tl.int64) * stride_wg
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(X + rows[:, None] * stride_xm + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_group + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST:  # Triton's CPU interpreter multiplies 16-bit floats wrongly in tl.dot
            a, b = a.to(ACC), b.to(ACC)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    tl.store(Y + rows[:, None] * stride_ym + cols[None, :], acc.to(Y.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


@_triton.jit
def _grouped_mm_weight_grad(DY, X, DW, OFFSETS, N, K, stride_dym, stride_xm, stride_dwg,
                            stride_dwn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                            UPCAST: tl.constexpr):
    group = tl.program_id(1)
    tiles_k = tl.cdiv(K, BLOCK_K)
    ns = (tl.program_id(0) // tiles_k) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = (tl.program_id(0) % tiles_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask, k_mask = ns < N, ks < K
    start = tl.load(OFFSETS + group)
    end = tl.load(OFFSETS + group + 1)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=ACC)
    for m0 in range(start, end, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_mask = rows < end
        dy = tl.load(DY + rows[:, None] * stride_dym + ns[None, :],
                     mask=row_mask[:, None] & n_mask[None, :], other=0.0)
        x = tl.load(X + rows[:, None] * stride_xm + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST:
            dy, x = dy.to(ACC), x.to(ACC)
        acc = tl.dot(tl.trans(dy), x, acc, input_precision=PRECISION)
    tl.store(DW + group.to(tl.int64) * stride_dwg + ns[:, None] * stride_dwn + ks[None, :],
             acc.to(DW.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])


def _tiles(m: int, n: int, k: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps): H100-sized tiles, shrunk for tiny problems (>= 16 for dot)."""
    fit = lambda size, cap: max(16, min(cap, _triton.row_block(size)))  # noqa: E731
    block_k = fit(k, 64 if dtype.itemsize <= 2 else 32)
    block_m, block_n = fit(m, 128), fit(n, 128)
    return block_m, block_n, block_k, 8 if block_m * block_n >= 128 * 128 else 4


def upcast_tiles(device: torch.device) -> bool:
    """Whether the kernels convert 16-bit tiles to the accumulator dtype before ``tl.dot``: only in
    Triton's CPU interpreter, which multiplies 16-bit floats wrongly there. Compiled kernels (CUDA)
    feed bf16/fp16 tiles to ``tl.dot`` as they are. One function, so a test can see or force the path."""
    return device.type != "cuda"


def _precision(dtype: torch.dtype):
    """Exact fp32 products for fp32 inputs (no silent TF32); the default for 16-bit inputs."""
    return "ieee" if dtype in (torch.float32, torch.float64) else None


def _forward(x: Tensor, w: Tensor, offsets: Tensor, stride_wn: int, stride_wk: int, n: int) -> Tensor:
    """``x @ w[g]`` with ``w[g]`` read as an ``[k, n]`` matrix through (stride_wk, stride_wn)."""
    m, k = x.shape
    groups = w.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    block_m, block_n, block_k, warps = _tiles(max(1, m // max(1, groups)), n, k, x.dtype)
    tiles = torch.zeros(groups + 1, device=x.device, dtype=torch.int32)
    counts = (offsets[1:] - offsets[:-1]).to(torch.int32)
    tiles[1:] = torch.cumsum((counts + block_m - 1) // block_m, 0)
    row_tiles = _triton.cdiv(m, block_m) + groups  # an upper bound: each group may end in a partial tile
    grid = (row_tiles * _triton.cdiv(n, block_n),)
    _triton.launch(_grouped_mm, grid, x.device, x, w, y, offsets, tiles, groups, n, k, x.stride(0),
                   w.stride(0), stride_wn, stride_wk, y.stride(0), row_tiles, BLOCK_M=block_m,
                   BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_G=_triton.row_block(groups), SWIZZLE=8,
                   PRECISION=_precision(x.dtype),
                   ACC=_triton.accumulator(x.dtype), UPCAST=upcast_tiles(x.device),
                   num_warps=warps, num_stages=3)
    return y


def _weight_grad(dy: Tensor, x: Tensor, offsets: Tensor, groups: int) -> Tensor:
    (m, n), k = dy.shape, x.shape[1]
    dw = torch.empty(groups, n, k, device=x.device, dtype=x.dtype)
    block_n, block_k, block_m, warps = _tiles(n, k, m, x.dtype)
    grid = (_triton.cdiv(n, block_n) * _triton.cdiv(k, block_k), groups)
    _triton.launch(_grouped_mm_weight_grad, grid, x.device, dy, x, dw, offsets, n, k, dy.stride(0),
                   x.stride(0), dw.stride(0), dw.stride(1), BLOCK_M=min(block_m, 64), BLOCK_N=block_n,
                   BLOCK_K=block_k, PRECISION=_precision(x.dtype), ACC=_triton.accumulator(x.dtype),
                   UPCAST=upcast_tiles(x.device), num_warps=warps, num_stages=3)
    return dw


class _GroupedMatmul(torch.autograd.Function):
    @staticmethod
    def forward(x, w, offsets):
        return _forward(x, w, offsets, w.stride(1), w.stride(2), w.shape[1])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, dy):
        x, w, offsets = ctx.saved_tensors
        want_dx, want_dw = ctx.needs_input_grad[:2]
        dx, dw = _triton.plain(functools.partial(_backward, want_dx=want_dx, want_dw=want_dw),
                               dy, x, w, offsets)
        return dx, dw, None


def _backward(dy, x, w, offsets, *, want_dx: bool, want_dw: bool):
    dy = dy.contiguous()
    dx = _forward(dy, w, offsets, w.stride(2), w.stride(1), w.shape[2]) if want_dx else None
    dw = _weight_grad(dy, x, offsets, w.shape[0]) if want_dw else None
    return dx, dw


def grouped_matmul(
    x: Float[Tensor, "rows d_in"],
    w: Float[Tensor, "groups d_out d_in"],
    offsets: Int[Tensor, " groups_plus_one"],
    *,
    impl: Choice = "auto",
) -> Float[Tensor, "rows d_out"]:
    """``y[offsets[g]:offsets[g+1]] = x[offsets[g]:offsets[g+1]] @ w[g].T`` for every group ``g``."""
    if offsets.shape[0] != w.shape[0] + 1 or x.shape[1] != w.shape[2]:
        raise ValueError(f"grouped_matmul: x {tuple(x.shape)}, w {tuple(w.shape)} and offsets "
                         f"{tuple(offsets.shape)} do not fit (offsets needs groups + 1 entries)")
    if resolve(impl, x.device) == "torch":
        return grouped_matmul_reference(x, w, offsets)
    if _vendor(x, w):
        return vendor_grouped_matmul(x, w, offsets)
    return _GroupedMatmul.apply(x.contiguous(), w.contiguous(), offsets.to(torch.int32).contiguous())


def _vendor(x: Tensor, w: Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs this product faster than the Triton kernel: bf16 on a
    Hopper-class GPU (compute capability 9.x; its kernels are built for sm90)."""
    if not hasattr(torch, "_grouped_mm") or x.device.type != "cuda" or x.dtype != torch.bfloat16 \
            or w.dtype != torch.bfloat16 or any(n % 8 for n in (x.shape[1], w.shape[1])):
        return False
    return torch.cuda.get_device_properties(x.device).major == 9


def vendor_grouped_matmul(
    x: Float[Tensor, "rows d_in"], w: Float[Tensor, "groups d_out d_in"], offsets: Int[Tensor, " groups_plus_one"]
) -> Float[Tensor, "rows d_out"]:
    """:func:`grouped_matmul` through ``torch._grouped_mm`` (differentiable; it takes each group's
    end row as int32 and ``w`` as ``[groups, d_in, d_out]``, a transposed view)."""
    return torch._grouped_mm(x.contiguous(), w.transpose(-2, -1), offs=offsets[1:].to(torch.int32))
