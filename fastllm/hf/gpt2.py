"""GPT-2 (Radford et al. 2019) and StarCoder / GPT-BigCode (Li et al. 2023): the ``transformer.h.{i}`` family.

Both are pre-LayerNorm decoders with learned positions, biases everywhere and a plain GELU MLP. They
differ in storage: GPT-2's ``Conv1D`` keeps weights as [in, out] and fuses ``c_attn`` as q|k|v
blocks of ``embed`` rows; GPT-BigCode uses ``nn.Linear`` ([out, in]) and its ``c_attn`` is
[embed + 2*head_dim] rows with ``multi_query`` (one shared key/value head), or per-head interleaved
[heads, (q, k, v), head_dim] rows without it.
"""

from __future__ import annotations

import torch

from fastllm.hf.common import (activation_from_hf, activation_to_hf, head_rules, is_tied_head, require_equal,
                               unsupported)
from fastllm.hf.rules import Rule, heads_out, rename, transposed
from fastllm.models.config import ModelConfig

__all__ = ["config_from_hf", "config_to_hf", "rules", "is_ignored"]


def _check_attention(hf, family: str) -> None:
    """Switches that change the attention maths away from softmax(q k^T / sqrt(head_dim)) v."""
    if not getattr(hf, "scale_attn_weights", True):
        raise unsupported(family, "scale_attn_weights", False, "fastllm always scales by 1/sqrt(head_dim)")
    for field in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if getattr(hf, field, False):
            raise unsupported(family, field, True)


def config_from_hf(hf, family: str) -> ModelConfig:
    """A transformers GPT2Config / GPTBigCodeConfig -> ModelConfig."""
    _check_attention(hf, family)
    n_kv_heads = hf.n_head if family == "gpt2" else (1 if hf.multi_query else hf.n_head)
    return ModelConfig(
        vocab_size=hf.vocab_size,
        embed_dim=hf.n_embd,
        n_layers=hf.n_layer,
        n_heads=hf.n_head,
        n_kv_heads=n_kv_heads,
        mlp_dim=hf.n_inner if hf.n_inner is not None else 4 * hf.n_embd,
        activation=activation_from_hf(family, "activation_function", hf.activation_function),
        gated_mlp=False,
        norm="layernorm",
        norm_eps=float(hf.layer_norm_epsilon),
        positions="learned",
        max_seq_len=hf.n_positions,
        qkv_bias=True,
        attention_out_bias=True,
        mlp_bias=True,
        tie_embeddings=bool(hf.tie_word_embeddings),
        init_std=float(hf.initializer_range),
        family=family,
    )


def config_to_hf(config: ModelConfig) -> dict:
    """Keyword arguments for GPT2Config / GPTBigCodeConfig."""
    for field, value in (("norm", "layernorm"), ("positions", "learned"), ("gated_mlp", False), ("qkv_bias", True),
                         ("attention_out_bias", True), ("mlp_bias", True), ("moe", None), ("sliding_window", None),
                         ("head_dim", config.embed_dim // config.n_heads)):
        require_equal(config, field, value)
    if config.family == "gpt2":
        require_equal(config, "n_kv_heads", config.n_heads)
    elif config.n_kv_heads not in (1, config.n_heads):
        raise unsupported(config.family, "n_kv_heads", config.n_kv_heads, "GPT-BigCode has 1 (multi_query) or n_heads")
    fields = dict(
        vocab_size=config.vocab_size, n_positions=config.max_seq_len, n_embd=config.embed_dim,
        n_layer=config.n_layers, n_head=config.n_heads, n_inner=config.mlp_dim,
        activation_function=activation_to_hf(config.activation, "gelu_new" if config.family == "gpt2"
                                             else "gelu_pytorch_tanh"),
        layer_norm_epsilon=config.norm_eps, initializer_range=config.init_std,
        tie_word_embeddings=config.tie_embeddings,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # fastllm trains without dropout
    )
    if config.family == "starcoder":
        fields["multi_query"] = config.n_kv_heads == 1
    return fields


def _split_qkv(config: ModelConfig, fused: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """[rows, ...] fused q|k|v (weight: [rows, embed], bias: [rows]) -> wq, wk, wv with head dims."""
    h, kv, d = config.n_heads, config.n_kv_heads, config.head_dim
    rest = fused.shape[1:]
    if config.family == "starcoder" and kv > 1:  # per-head interleaved q_h, k_h, v_h
        q, k, v = fused.reshape(h, 3, d, *rest).unbind(1)
        return q, k, v
    q, k, v = fused.split([h * d, kv * d, kv * d])
    return q.reshape(h, d, *rest), k.reshape(kv, d, *rest), v.reshape(kv, d, *rest)


def _fuse_qkv(config: ModelConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    rest = q.shape[2:]
    if config.family == "starcoder" and config.n_kv_heads > 1:
        return torch.stack([q, k, v], dim=1).reshape(-1, *rest)
    return torch.cat([q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)])


def _qkv_rule(config: ModelConfig, hf: str, ours: str) -> Rule:
    conv1d = config.family == "gpt2"  # [in, out] storage

    def to_ours(w, b):
        return (*_split_qkv(config, w.t() if conv1d else w), *_split_qkv(config, b))

    def to_hf(wq, wk, wv, bq, bk, bv):
        w = _fuse_qkv(config, wq, wk, wv)
        return (w.t() if conv1d else w), _fuse_qkv(config, bq, bk, bv)

    names = tuple(f"{ours}.{leaf}" for leaf in ("wq", "wk", "wv", "bq", "bk", "bv"))
    return Rule((f"{hf}.weight", f"{hf}.bias"), names, to_ours, to_hf)


def _out_rule(config: ModelConfig, hf: str, ours: str) -> Rule:
    if config.family == "starcoder":
        return heads_out(hf, ours, config.n_heads, config.head_dim)
    h, d = config.n_heads, config.head_dim
    return Rule((hf,), (ours,), lambda w: (w.t().reshape(w.shape[1], h, d),),
                lambda wo: (wo.reshape(wo.shape[0], h * d).t(),))


def rules(config: ModelConfig, names: frozenset[str] = frozenset()) -> list[Rule]:
    linear = transposed if config.family == "gpt2" else rename
    out = [rename("transformer.wte.weight", "embed.tokens"), rename("transformer.wpe.weight", "embed.positions")]
    for i in range(config.n_layers):
        hf, ours = f"transformer.h.{i}", f"layers.{i}"
        out += [rename(f"{hf}.ln_1.weight", f"{ours}.attention_norm.scale"),
                rename(f"{hf}.ln_1.bias", f"{ours}.attention_norm.bias"),
                _qkv_rule(config, f"{hf}.attn.c_attn", f"{ours}.attention"),
                _out_rule(config, f"{hf}.attn.c_proj.weight", f"{ours}.attention.wo"),
                rename(f"{hf}.attn.c_proj.bias", f"{ours}.attention.bo"),
                rename(f"{hf}.ln_2.weight", f"{ours}.mlp_norm.scale"),
                rename(f"{hf}.ln_2.bias", f"{ours}.mlp_norm.bias"),
                linear(f"{hf}.mlp.c_fc.weight", f"{ours}.mlp.w_up"),
                rename(f"{hf}.mlp.c_fc.bias", f"{ours}.mlp.b_up"),
                linear(f"{hf}.mlp.c_proj.weight", f"{ours}.mlp.w_down"),
                rename(f"{hf}.mlp.c_proj.bias", f"{ours}.mlp.b_down")]
    out += [rename("transformer.ln_f.weight", "final_norm.scale"), rename("transformer.ln_f.bias", "final_norm.bias")]
    return out + head_rules(config)


def is_ignored(name: str, config: ModelConfig) -> bool:
    """Old GPT-2 files carry the causal-mask buffers ``attn.bias`` / ``attn.masked_bias``."""
    return (name.endswith(".attn.bias") or name.endswith(".attn.masked_bias")
            or is_tied_head(name, config))
