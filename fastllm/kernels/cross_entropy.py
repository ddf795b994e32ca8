"""Cross-entropy fused with the LM head, in chunks of tokens: the ``[tokens, vocab]`` logits never exist.

Per token, with logits x = W h (W the local vocab shard), lse = logsumexp(x), target t, smoothing
eps over the global vocab V and z-loss weight z (PaLM, Chowdhery et al. 2022):

    loss = (1 - eps) (lse - x_t) + eps (lse - sum_j x_j / V) + z lse^2
    dloss/dx_j = p_j (1 + 2 z lse) - eps / V - (1 - eps) [j == t],    p_j = exp(x_j - lse)

For each chunk of tokens: one matmul makes the chunk's logits; a Triton kernel reduces each row to
(max, sum of exp, target logit, sum of logits) with per-lane online softmax; on a vocab shard these
four are combined over the tensor-parallel group (max, then sums: the vocab-parallel cross-entropy
of Megatron-LM, Shoeybi et al. 2019); a second kernel overwrites the logits with dloss/dx in place;
two matmuls turn that into the chunk's ``dh`` and its share of ``dW``. Gradients are thus made in the
forward pass (when autograd needs them) and backward only scales them by the incoming gradient.
Memory beyond the inputs: one chunk of logits, ``dh`` and ``dW``. ``dW`` accumulates in W's dtype
(one rounding per chunk, as cuBLAS' ``beta=1`` does); ``dh`` on a vocab shard is this shard's partial
sum: the caller's column-parallel input op (identity forward, all-reduce backward) completes it.
"""

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int, Shaped
from torch import Tensor

from fastllm.kernels import _triton
from fastllm.kernels._triton import tl
from fastllm.kernels.registry import Choice, resolve

__all__ = ["VocabShard", "fused_linear_cross_entropy", "linear_cross_entropy_reference", "cross_entropy_reference",
           "token_weights"]

_BLOCK = 4096
# Elements of one chunk's logits (512 MiB in bf16; 2048 tokens at vocab 128k). Each chunk also
# reads and writes all of dW once (addmm with beta=1), so chunks much smaller than this would turn
# the loss memory-bound on dW traffic: 16k tokens in 64 chunks would move 128 GB at vocab 128k.
_LOGITS_PER_CHUNK = 1 << 28


@dataclass(frozen=True)
class VocabShard:
    """This rank holds vocab rows ``[start, start + local size)`` of ``size``; stats reduce over ``group``."""

    start: int
    size: int
    group: Any = None  # a torch.distributed ProcessGroup (None: the default group)


def _all_reduce(t: Tensor, shard: Optional[VocabShard], op: str, differentiable: bool = False) -> Tensor:
    if shard is None:
        return t
    import torch.distributed as dist

    reduce_op = {"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}[op]
    if differentiable:
        return _SumOverShards.apply(t, shard.group)
    t = t.clone()
    dist.all_reduce(t, op=reduce_op, group=shard.group)
    return t


class _SumOverShards(torch.autograd.Function):
    """All-reduce sum whose backward is the identity: every rank computes the same loss from the
    summed statistics, so each shard's gradient is just the loss gradient (Megatron's convention;
    ``torch.distributed.nn.all_reduce`` would sum it over ranks instead)."""

    @staticmethod
    def forward(t, group):
        import torch.distributed as dist

        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _per_token_loss(lse, target_logit, logit_sum, vocab, z_loss, label_smoothing):
    nll = lse - target_logit
    loss = (1 - label_smoothing) * nll + label_smoothing * (lse - logit_sum / vocab)
    return loss + z_loss * lse.square() if z_loss else loss


def token_weights(
    targets: Int[Tensor, "*batch"], ignore_index: int, loss_mask: Optional[Tensor],
    dtype: torch.dtype = torch.float32,
) -> Float[Tensor, " tokens"]:
    """Each token's weight in the loss, flattened: 0 where ignored, else the (bool or float) loss mask."""
    weight = (targets.reshape(-1) != ignore_index).to(dtype)
    return weight if loss_mask is None else weight * loss_mask.reshape(-1).to(dtype)


def _normalised(weight: Tensor, reduction: str) -> Tensor:
    """Weights that turn a weighted sum into the requested reduction (0/0 counts as 0)."""
    if reduction == "sum":
        return weight
    return weight / weight.sum().clamp(min=torch.finfo(weight.dtype).tiny)


def linear_cross_entropy_reference(hidden, weight, targets, *, ignore_index=-100, z_loss=0.0,
                                   label_smoothing=0.0, reduction="mean", shard=None, loss_mask=None):
    """Unfused: full logits in fp32; on a vocab shard the same stats go through all-reduces."""
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight)  # [tokens, V_local]
    return cross_entropy_reference(logits, targets, ignore_index=ignore_index, z_loss=z_loss,
                                   label_smoothing=label_smoothing, reduction=reduction, shard=shard,
                                   loss_mask=loss_mask)


def cross_entropy_reference(logits, targets, *, ignore_index=-100, z_loss=0.0, label_smoothing=0.0,
                            reduction="mean", shard=None, loss_mask=None):
    """The loss of ``logits`` ``[..., V_local]`` in fp32; with ``shard`` the logits are this rank's
    block of the vocabulary and the row statistics are all-reduced over its group."""
    logits = _triton.upcast(logits.reshape(-1, logits.shape[-1]))  # [tokens, V_local]
    targets = targets.reshape(-1)
    local = targets - (shard.start if shard else 0)
    in_shard = (local >= 0) & (local < logits.shape[1]) & (targets != ignore_index)
    top = _all_reduce(logits.detach().amax(-1), shard, "max")
    sum_exp = _all_reduce((logits - top[:, None]).exp().sum(-1), shard, "sum", differentiable=True)
    lse = top + sum_exp.log()
    picked = logits.gather(1, local.clamp(0, logits.shape[1] - 1)[:, None])[:, 0] * in_shard
    picked = _all_reduce(picked, shard, "sum", differentiable=True)
    logit_sum = _all_reduce(logits.sum(-1), shard, "sum", differentiable=True)
    vocab = shard.size if shard else logits.shape[1]
    per_token = _per_token_loss(lse, picked, logit_sum, vocab, z_loss, label_smoothing)
    token_weight = _normalised(token_weights(targets, ignore_index, loss_mask, logits.dtype), reduction)
    return (per_token * token_weight).sum()


@_triton.jit
def _row_stats(LOGITS, TARGET, MAX, SUMEXP, PICKED, TOTAL, stride, n_vocab,
               BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    cols = tl.arange(0, BLOCK)
    top = tl.full([BLOCK], -3.0e38, dtype=ACC)
    sum_exp = tl.zeros([BLOCK], dtype=ACC)
    total = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, n_vocab, BLOCK):
        mask = start + cols < n_vocab
        x = tl.load(base + start + cols, mask=mask, other=float("-inf")).to(ACC)
        new_top = tl.maximum(top, x)
        sum_exp = sum_exp * tl.exp(top - new_top) + tl.exp(x - new_top)
        top = new_top
        total += tl.where(mask, x, 0.0)
    row_top = tl.max(top, axis=0)
    tl.store(MAX + row, row_top)
    tl.store(SUMEXP + row, tl.sum(sum_exp * tl.exp(top - row_top), axis=0))
    tl.store(TOTAL + row, tl.sum(total, axis=0))
    target = tl.load(TARGET + row)
    in_shard = (target >= 0) & (target < n_vocab)
    picked = tl.load(base + tl.where(in_shard, target, 0)).to(ACC)
    tl.store(PICKED + row, tl.where(in_shard, picked, 0.0))


@_triton.jit
def _logits_grad(LOGITS, TARGET, LSE, SCALE, stride, n_vocab, z_loss, smooth_per_class, on_target,
                 BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Overwrite a row of logits with dloss/dlogits (times the row's scale; zero for ignored rows)."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    cols = tl.arange(0, BLOCK)
    lse = tl.load(LSE + row)
    scale = tl.load(SCALE + row)
    target = tl.load(TARGET + row)
    softmax_scale = 1.0 + 2.0 * z_loss * lse
    for start in range(0, n_vocab, BLOCK):
        mask = start + cols < n_vocab
        x = tl.load(base + start + cols, mask=mask, other=0.0).to(ACC)
        grad = tl.exp(x - lse) * softmax_scale - smooth_per_class
        # not `grad -= tl.where(.., on_target, 0.0)`: that makes an fp32 tensor of the scalar, which
        # rounds 1 - eps to fp32 in an fp64 run (1e-8 relative, seen by the fp64 reference test)
        grad = tl.where(start + cols == target, grad - on_target, grad)
        tl.store(base + start + cols, (grad * scale).to(LOGITS.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class _Options:
    ignore_index: int
    z_loss: float
    label_smoothing: float
    reduction: Literal["mean", "sum"]
    chunk_size: Optional[int]
    shard: Optional[VocabShard]
    grad_hidden: bool
    grad_weight: bool


def _chunk_rows(n_rows: int, n_vocab: int, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        return max(1, int(chunk_size))
    rows = max(16, _LOGITS_PER_CHUNK // n_vocab // 64 * 64)  # a multiple of 64 rows suits the matmuls
    return min(n_rows, rows)


def _chunk_lse(logits: Tensor, local: Tensor, shard: Optional[VocabShard]):
    """(lse, target logit, sum of logits) of each row, over the whole (possibly sharded) vocab."""
    rows, n_vocab = logits.shape
    acc = torch.promote_types(logits.dtype, torch.float32)
    top, sum_exp, picked, total = torch.empty(4, rows, device=logits.device, dtype=acc)
    _triton.launch(_row_stats, (rows,), logits.device, logits, local, top, sum_exp, picked, total,
                   logits.stride(0), n_vocab, BLOCK=min(_BLOCK, _triton.row_block(n_vocab)),
                   ACC=_triton.accumulator(acc), num_warps=8)
    if shard is not None:
        global_top = _all_reduce(top, shard, "max")
        sums = _all_reduce(torch.stack([sum_exp * (top - global_top).exp(), picked, total]), shard, "sum")
        top, (sum_exp, picked, total) = global_top, sums
    return top + sum_exp.log(), picked, total


def _fused_forward(hidden: Tensor, weight: Tensor, targets: Tensor, loss_mask: Optional[Tensor], o: _Options):
    n_rows, n_vocab = hidden.shape[0], weight.shape[0]
    vocab = o.shard.size if o.shard is not None else n_vocab
    valid = targets != o.ignore_index
    local = targets - (o.shard.start if o.shard is not None else 0)
    local = torch.where(valid & (local >= 0) & (local < n_vocab), local, -1)  # -1: not in this shard
    acc = torch.promote_types(hidden.dtype, torch.float32)
    weight_of_row = _normalised(token_weights(targets, o.ignore_index, loss_mask, acc), o.reduction)
    per_token = torch.empty(n_rows, device=hidden.device, dtype=acc)
    grad_hidden = torch.empty_like(hidden) if o.grad_hidden else None
    grad_weight = torch.zeros_like(weight) if o.grad_weight else None
    step = _chunk_rows(n_rows, n_vocab, o.chunk_size)
    for start in range(0, n_rows, step):
        rows = slice(start, min(start + step, n_rows))
        h = hidden[rows]
        logits = F.linear(h, weight)  # [chunk, V_local], the only vocab-sized buffer
        lse, picked, total = _chunk_lse(logits, local[rows], o.shard)
        per_token[rows] = _per_token_loss(lse, picked, total, vocab, o.z_loss, o.label_smoothing)
        if grad_hidden is None and grad_weight is None:
            continue
        _triton.launch(_logits_grad, (logits.shape[0],), logits.device, logits, local[rows], lse,
                       weight_of_row[rows], logits.stride(0), n_vocab, float(o.z_loss),
                       o.label_smoothing / vocab, 1.0 - o.label_smoothing,
                       BLOCK=min(_BLOCK, _triton.row_block(n_vocab)), ACC=_triton.accumulator(acc),
                       num_warps=8)
        if grad_hidden is not None:
            torch.mm(logits, weight, out=grad_hidden[rows])
        if grad_weight is not None:
            grad_weight.addmm_(logits.t(), h)
    return (per_token * weight_of_row).sum(), grad_hidden, grad_weight


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(hidden, weight, targets, loss_mask, options):
        return _fused_forward(hidden, weight, targets, loss_mask, options)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, grad_hidden, grad_weight = output
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(*(g for g in (grad_hidden, grad_weight) if g is not None))

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = lambda g: None if g is None else g * grad_loss.to(g.dtype)  # noqa: E731
        return scale(grad_hidden), scale(grad_weight), None, None, None


def fused_linear_cross_entropy(
    hidden: Float[Tensor, "*batch embed"],
    weight: Float[Tensor, "vocab embed"],
    targets: Int[Tensor, "*batch"],
    *,
    ignore_index: int = -100,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    reduction: Literal["mean", "sum"] = "mean",
    chunk_size: Optional[int] = None,
    shard: Optional[VocabShard] = None,
    loss_mask: Optional[Shaped[Tensor, "*batch"]] = None,
    impl: Choice = "auto",
) -> Float[Tensor, ""]:
    """Cross-entropy of ``hidden @ weight.T`` against ``targets``, mean (or sum) over valid targets.

    ``weight`` is the LM head ``[vocab, embed]`` (or this rank's vocab shard, described by
    ``shard``); targets equal to ``ignore_index`` count for nothing; ``z_loss`` adds
    ``z_loss * lse^2`` per token; ``label_smoothing`` as ``torch.nn.functional.cross_entropy``.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if hidden.shape[:-1] != targets.shape or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"fused_linear_cross_entropy: hidden {tuple(hidden.shape)}, weight "
                         f"{tuple(weight.shape)} and targets {tuple(targets.shape)} do not fit")
    if resolve(impl, hidden.device) == "torch":
        return linear_cross_entropy_reference(
            hidden, weight, targets, ignore_index=ignore_index, z_loss=z_loss,
            label_smoothing=label_smoothing, reduction=reduction, shard=shard, loss_mask=loss_mask)
    grad_on = torch.is_grad_enabled()
    options = _Options(ignore_index, float(z_loss), float(label_smoothing), reduction, chunk_size,
                       shard, grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    if hidden2d.stride(-1) != 1:
        hidden2d = hidden2d.contiguous()
    mask = None if loss_mask is None else loss_mask.reshape(-1)
    return _FusedLinearCrossEntropy.apply(hidden2d, weight, targets.reshape(-1), mask, options)[0]
