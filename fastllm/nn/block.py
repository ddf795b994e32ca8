"""The pre-norm decoder block (GPT-2, Radford et al. 2019; Llama, Touvron et al. 2023):

    x = x + attention(norm(x))
    x = x + mlp(norm(x))          # or a mixture of experts in place of the MLP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from jaxtyping import Float, Int
from torch import Tensor

from fastllm.kernels import KernelConfig
from fastllm.nn import attention, mlp, moe, norm
from fastllm.nn.ops import Layout
from fastllm.nn.norm import NormKind

__all__ = ["Block", "params", "apply"]


@dataclass(frozen=True)
class Block:
    attention: attention.Attention
    ffn: Union[mlp.MLP, moe.MoE]
    norm: NormKind = "rmsnorm"
    norm_eps: float = 1e-5
    kernels: KernelConfig = KernelConfig()  # for the norms; attention and ffn carry their own

    @property
    def ffn_name(self) -> str:
        return "moe" if isinstance(self.ffn, moe.MoE) else "mlp"


def params(layer: Block) -> dict:
    e = layer.attention.embed_dim
    ffn = moe.params(layer.ffn) if layer.ffn_name == "moe" else mlp.params(layer.ffn)
    return {
        "attention_norm": norm.params(e, kind=layer.norm),
        "attention": attention.params(layer.attention),
        "mlp_norm": norm.params(e, kind=layer.norm),
        layer.ffn_name: ffn,
    }


def apply(
    layer: Block,
    p: dict,
    x: Float[Tensor, "batch seq_shard embed"],
    *,
    rope: Optional[tuple[Tensor, Tensor]] = None,
    segment_ids: Optional[Int[Tensor, "batch seq"]] = None,
    layout: Optional[Layout] = None,
    cache: Optional[attention.KVCache] = None,
) -> Union[
    tuple[Float[Tensor, "batch seq_shard embed"], Optional[Tensor]],
    tuple[Float[Tensor, "batch seq_shard embed"], Optional[Tensor], attention.KVCache],
]:
    """(new residual stream, router logits or ``None`` for a dense block), and with a ``cache``
    (decoding, see :func:`attention.apply`) its extension by ``x``'s keys and values.

    ``layout`` (see :mod:`fastllm.nn.ops`): ``x`` is the residual stream ``("batch", "seq", "embed")``
    laid out as the rules say (``seq_shard``: a block of the sequence when they split ``seq``);
    ``rope`` and ``segment_ids`` are inputs (whole sequences).
    """
    h = norm.apply(p["attention_norm"], x, eps=layer.norm_eps, kernels=layer.kernels)
    out = attention.apply(
        layer.attention, p["attention"], h, rope=rope, segment_ids=segment_ids, layout=layout, cache=cache
    )
    if cache is not None:
        out, cache = out
    x = x + out
    h = norm.apply(p["mlp_norm"], x, eps=layer.norm_eps, kernels=layer.kernels)
    if layer.ffn_name == "moe":
        out, router_logits = moe.apply(layer.ffn, p["moe"], h, layout=layout)
    else:
        out, router_logits = mlp.apply(layer.ffn, p["mlp"], h, layout=layout), None
    return (x + out, router_logits) if cache is None else (x + out, router_logits, cache)
