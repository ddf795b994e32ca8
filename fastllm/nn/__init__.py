"""Pure layers: each an ``params`` declaration (shapes, logical axes, init) beside its ``apply``.

Layers take explicit dimensions (or a small frozen dataclass such as :class:`attention.Attention`),
never a model config, so new architectures compose them freely::

    from fastllm import nn
    layer = nn.attention.Attention(embed_dim=64, n_heads=4)
    p = nn.init(nn.attention.params(layer), key)
    y = nn.attention.apply(layer, p, x)
"""

from fastllm.nn import attention, block, embedding, linear, loss, mlp, model, moe, norm, ops, param, rotary
from fastllm.nn.attention import Attention, dot_product_attention
from fastllm.nn.block import Block
from fastllm.nn.loss import IGNORE_INDEX, cross_entropy
from fastllm.nn.mlp import MLP
from fastllm.nn.model import Model, Part, run
from fastllm.nn.moe import MoE
from fastllm.nn.param import Param, axes, count, init, is_param, shapes
from fastllm.nn.rotary import Rotary

__all__ = [
    "param",
    "linear",
    "embedding",
    "norm",
    "rotary",
    "attention",
    "mlp",
    "moe",
    "block",
    "ops",
    "model",
    "Model",
    "Part",
    "run",
    "loss",
    "Param",
    "axes",
    "count",
    "init",
    "is_param",
    "shapes",
    "Attention",
    "MLP",
    "MoE",
    "Block",
    "Rotary",
    "dot_product_attention",
    "cross_entropy",
    "IGNORE_INDEX",
]
