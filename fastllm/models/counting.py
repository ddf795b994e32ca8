"""Parameter and FLOP counts from the config alone (no tensors are built).

FLOPs per token (DESIGN.md; Kaplan et al. 2020, Chinchilla appendix F):
``6 * N_matmul + 6 * L * s * (n_heads * head_dim)`` where ``N_matmul`` counts every weight matrix
used in a matmul (attention and MLP projections, the MoE router and the *active* experts only, the
LM head once even when tied) and leaves out embedding lookups, norms and biases. The second term is
the attention scores and weighted sum (``q k^T`` and ``p v``: 2 * 2 * s * d forward, times 3).
"""

from __future__ import annotations

from fastllm import nn, tree
from fastllm.models.config import ModelConfig
from fastllm.models.decoder import param_specs

__all__ = ["param_count", "flops_per_token", "matmul_param_count"]

_MATMUL_LEAVES = ("wq", "wk", "wv", "wo", "w_up", "w_gate", "w_down", "router")


def _expert_share(config: ModelConfig) -> float:
    return config.moe.top_k / config.moe.n_experts if config.moe is not None else 1.0


def _count(config: ModelConfig, *, active: bool, matmul_only: bool) -> int:
    share = _expert_share(config) if active else 1.0
    total = 0.0
    for path, spec in tree.leaves_with_path(param_specs(config), is_leaf=nn.is_param):
        leaf = path.rsplit(".", 1)[-1]
        if matmul_only and leaf not in _MATMUL_LEAVES and path != "lm_head.w":
            continue
        is_expert_weight = ".moe." in path and leaf != "router"
        total += spec.numel * (share if is_expert_weight else 1.0)
    return int(round(total))


def param_count(config: ModelConfig, *, active: bool = False) -> int:
    """Stored parameters (tied embeddings once); ``active``: only top_k of n_experts experts."""
    return _count(config, active=active, matmul_only=False)


def matmul_param_count(config: ModelConfig) -> int:
    """``N_matmul``: active matmul weights, with the LM head counted even when tied."""
    n = _count(config, active=True, matmul_only=True)
    if config.tie_embeddings:
        n += config.vocab_size * config.embed_dim
    return n


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at sequence length ``seq_len``."""
    attention = 6 * config.n_layers * seq_len * config.n_heads * config.head_dim
    return float(6 * matmul_param_count(config) + attention)
