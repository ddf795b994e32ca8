"""Llama 2/3, Mistral, Mixtral and Qwen2: the ``model.layers.{i}`` family of transformers.

All four are pre-RMSNorm decoders with rotary attention (rotate_half layout) and a SwiGLU MLP;
they differ in biases (Llama ``attention_bias``/``mlp_bias``, Qwen2's q/k/v bias), the sliding
window (Mistral and Mixtral on every layer, Qwen2 on layers >= ``max_window_layers``) and Mixtral's
mixture of experts (Jiang et al. 2024), whose experts transformers 5 keeps fused in memory
(``mlp.experts.gate_up_proj`` [E, 2*mlp, embed], ``mlp.experts.down_proj`` [E, embed, mlp]) but
writes per expert (``block_sparse_moe.experts.{e}.w1|w2|w3``, w1 = gate, w3 = up, w2 = down).
"""

from __future__ import annotations

import torch

from fastllm.hf.common import (activation_from_hf, activation_to_hf, head_rules, is_tied_head, require_equal,
                               rope_from_hf, rope_to_hf, unsupported, window_fields, window_pattern)
from fastllm.hf.rules import Rule, heads_in, heads_out, rename
from fastllm.models.config import ModelConfig, MoEConfig

__all__ = ["config_from_hf", "config_to_hf", "rules", "is_ignored"]


def _window_from_hf(hf, family: str) -> dict:
    if family == "qwen2":
        layer_types = list(hf.layer_types)
        unknown = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
        if unknown:
            raise unsupported(family, "layer_types", unknown)
        pattern = [kind == "sliding_attention" for kind in layer_types]
        return window_fields(family, pattern, hf.sliding_window, "layer_types (from use_sliding_window, "
                             f"max_window_layers={hf.max_window_layers})")
    if family in ("mistral", "mixtral"):
        return {"sliding_window": hf.sliding_window}
    return {}


def _moe_from_hf(hf) -> MoEConfig:
    if hf.router_jitter_noise:
        raise unsupported("mixtral", "router_jitter_noise", hf.router_jitter_noise, "fastllm routes without noise")
    return MoEConfig(n_experts=hf.num_local_experts, top_k=hf.num_experts_per_tok, normalize_top_k=True,
                     aux_loss_coef=float(hf.router_aux_loss_coef))


def config_from_hf(hf, family: str) -> ModelConfig:
    """A transformers LlamaConfig / MistralConfig / MixtralConfig / Qwen2Config -> ModelConfig."""
    bias = {"llama": getattr(hf, "attention_bias", False), "qwen2": True}.get(family, False)
    return ModelConfig(
        vocab_size=hf.vocab_size,
        embed_dim=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_key_value_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        mlp_dim=hf.intermediate_size,
        activation=activation_from_hf(family, "hidden_act", hf.hidden_act),
        gated_mlp=True,
        norm="rmsnorm",
        norm_eps=float(hf.rms_norm_eps),
        positions="rotary",
        max_seq_len=hf.max_position_embeddings,
        rope=rope_from_hf(family, dict(hf.rope_parameters or {}), hf.max_position_embeddings),
        qkv_bias=bool(bias),
        attention_out_bias=bool(bias) and family == "llama",
        mlp_bias=bool(getattr(hf, "mlp_bias", False)) if family == "llama" else False,
        tie_embeddings=bool(hf.tie_word_embeddings),
        moe=_moe_from_hf(hf) if family == "mixtral" else None,
        init_std=float(hf.initializer_range),
        family=family,
        **_window_from_hf(hf, family),
    )


def _check_exportable(config: ModelConfig) -> None:
    family = config.family
    for field, value in (("norm", "rmsnorm"), ("positions", "rotary"), ("gated_mlp", True)):
        require_equal(config, field, value)
    if family != "llama":
        require_equal(config, "attention_out_bias", False)
        require_equal(config, "mlp_bias", False)
        require_equal(config, "qkv_bias", family == "qwen2")
    elif config.qkv_bias != config.attention_out_bias:
        require_equal(config, "attention_out_bias", config.qkv_bias)  # Llama's attention_bias covers q, k, v and o
    if family == "mixtral":
        if config.moe is None:
            raise unsupported(family, "moe", None, "Mixtral needs a MoEConfig")
        require_equal(config, "moe.normalize_top_k", True)
        require_equal(config, "moe.capacity_factor", None)  # Mixtral is dropless
    else:
        require_equal(config, "moe", None)
    if family == "llama":
        require_equal(config, "sliding_window", None)


def _window_to_hf(config: ModelConfig) -> dict:
    pattern = window_pattern(config)
    if config.family == "qwen2":
        first_sliding = pattern.index(True) if any(pattern) else config.n_layers
        return {"use_sliding_window": any(pattern), "sliding_window": config.sliding_window,
                "max_window_layers": first_sliding,
                "layer_types": ["sliding_attention" if p else "full_attention" for p in pattern]}
    if config.family in ("mistral", "mixtral"):
        if any(pattern) and not all(pattern):
            require_equal(config, "sliding_window_layers", None)  # the window covers every layer here
        return {"sliding_window": config.sliding_window if any(pattern) else None}
    return {}


def config_to_hf(config: ModelConfig) -> dict:
    """Keyword arguments for the transformers config class of ``config.family``."""
    _check_exportable(config)
    fields = dict(
        vocab_size=config.vocab_size, hidden_size=config.embed_dim, intermediate_size=config.mlp_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim,
        hidden_act=activation_to_hf(config.activation), max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps, initializer_range=config.init_std,
        tie_word_embeddings=config.tie_embeddings, rope_parameters=rope_to_hf(config), attention_dropout=0.0,
        **_window_to_hf(config),
    )
    if config.family == "llama":
        fields.update(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
    if config.family == "mixtral":
        fields.update(num_local_experts=config.moe.n_experts, num_experts_per_tok=config.moe.top_k,
                      router_aux_loss_coef=config.moe.aux_loss_coef, router_jitter_noise=0.0)
    return fields


def _attention_rules(config: ModelConfig, hf: str, ours: str) -> list[Rule]:
    h, kv, d = config.n_heads, config.n_kv_heads, config.head_dim
    rules = [heads_in(f"{hf}.q_proj.weight", f"{ours}.wq", h, d),
             heads_in(f"{hf}.k_proj.weight", f"{ours}.wk", kv, d),
             heads_in(f"{hf}.v_proj.weight", f"{ours}.wv", kv, d),
             heads_out(f"{hf}.o_proj.weight", f"{ours}.wo", h, d)]
    if config.qkv_bias:
        rules += [heads_in(f"{hf}.q_proj.bias", f"{ours}.bq", h, d),
                  heads_in(f"{hf}.k_proj.bias", f"{ours}.bk", kv, d),
                  heads_in(f"{hf}.v_proj.bias", f"{ours}.bv", kv, d)]
    if config.attention_out_bias:
        rules.append(rename(f"{hf}.o_proj.bias", f"{ours}.bo"))
    return rules


def _mlp_rules(config: ModelConfig, hf: str, ours: str) -> list[Rule]:
    rules = [rename(f"{hf}.{name}_proj.weight", f"{ours}.w_{name}") for name in ("gate", "up", "down")]
    if config.mlp_bias:
        rules += [rename(f"{hf}.{name}_proj.bias", f"{ours}.b_{name}") for name in ("gate", "up", "down")]
    return rules


def _per_expert(names: tuple[str, ...], ours: str) -> Rule:
    return Rule(names, (ours,), lambda *experts: (torch.stack(experts),), lambda stacked: tuple(stacked.unbind(0)))


def _moe_rules(config: ModelConfig, layer: str, ours: str, fused: bool) -> list[Rule]:
    if fused:  # transformers 5 in-memory layout
        mlp = config.mlp_dim
        return [rename(f"{layer}.mlp.gate.weight", f"{ours}.router"),
                Rule((f"{layer}.mlp.experts.gate_up_proj",), (f"{ours}.w_gate", f"{ours}.w_up"),
                     lambda w: (w[:, :mlp], w[:, mlp:]), lambda gate, up: (torch.cat([gate, up], dim=1),)),
                rename(f"{layer}.mlp.experts.down_proj", f"{ours}.w_down")]
    experts = f"{layer}.block_sparse_moe.experts"
    n = config.moe.n_experts
    return [rename(f"{layer}.block_sparse_moe.gate.weight", f"{ours}.router"),
            _per_expert(tuple(f"{experts}.{e}.w1.weight" for e in range(n)), f"{ours}.w_gate"),
            _per_expert(tuple(f"{experts}.{e}.w3.weight" for e in range(n)), f"{ours}.w_up"),
            _per_expert(tuple(f"{experts}.{e}.w2.weight" for e in range(n)), f"{ours}.w_down")]


def rules(config: ModelConfig, names: frozenset[str] = frozenset()) -> list[Rule]:
    """Every weight of the checkpoint; ``names`` (the checkpoint's) picks Mixtral's fused layout if present."""
    out = [rename("model.embed_tokens.weight", "embed.tokens")]
    for i in range(config.n_layers):
        layer, ours = f"model.layers.{i}", f"layers.{i}"
        out.append(rename(f"{layer}.input_layernorm.weight", f"{ours}.attention_norm.scale"))
        out += _attention_rules(config, f"{layer}.self_attn", f"{ours}.attention")
        out.append(rename(f"{layer}.post_attention_layernorm.weight", f"{ours}.mlp_norm.scale"))
        if config.moe is not None:
            out += _moe_rules(config, layer, f"{ours}.moe", f"{layer}.mlp.experts.gate_up_proj" in names)
        else:
            out += _mlp_rules(config, f"{layer}.mlp", f"{ours}.mlp")
    out.append(rename("model.norm.weight", "final_norm.scale"))
    return out + head_rules(config)


def is_ignored(name: str, config: ModelConfig) -> bool:
    """Non-parameters some checkpoints carry (rotary caches) and the duplicate of a tied head."""
    return name.endswith("rotary_emb.inv_freq") or is_tied_head(name, config)
