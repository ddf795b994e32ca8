"""The decoder's loss computed through fastllm.kernels: the wiring the integrator moves into nn/models.

Mirrors ``fastllm.models.decoder.loss`` line for line, swapping each layer's math for its kernel:
norms -> rms_norm/layer_norm, rotary -> apply_rotary, attention core -> attention, gated MLP ->
gated, MoE experts -> moe_experts, LM head + loss -> fused_linear_cross_entropy.
"""

import torch
import torch.nn.functional as F

from fastllm import kernels, models, nn
from fastllm.kernels import KernelConfig


def _norm(p, x, eps, k: KernelConfig):
    if "bias" in p:
        return kernels.layer_norm(x, p["scale"], p["bias"], eps, impl=k.layer_norm)
    return kernels.rms_norm(x, p["scale"], eps, impl=k.rms_norm)


def _project(x, w, b):  # [batch, seq, embed] -> [batch, heads, seq, head_dim]
    heads, head_dim, embed = w.shape
    y = F.linear(x, w.reshape(heads * head_dim, embed), None if b is None else b.reshape(-1))
    return y.unflatten(-1, (heads, head_dim)).transpose(1, 2)


def _attention(layer, p, x, rope, segment_ids, k: KernelConfig):
    q, kk, v = _project(x, p["wq"], p.get("bq")), _project(x, p["wk"], p.get("bk")), _project(x, p["wv"], p.get("bv"))
    if rope is not None:
        q, kk = kernels.apply_rotary(q, kk, *rope, impl=k.rotary)
    out = kernels.attention(q, kk, v, window=layer.window, segment_ids=segment_ids, impl=k.attention)
    out = out.transpose(1, 2).flatten(2)  # [batch, seq, heads * head_dim]
    return F.linear(out, p["wo"].reshape(p["wo"].shape[0], -1), p.get("bo"))


def _mlp(layer, p, x, k: KernelConfig):
    up = F.linear(x, p["w_up"], p.get("b_up"))
    if "w_gate" in p:
        hidden = kernels.gated(F.linear(x, p["w_gate"], p.get("b_gate")), up, layer.activation, impl=k.activation)
    else:
        hidden = kernels.activation(up, layer.activation, impl=k.activation)
    return F.linear(hidden, p["w_down"], p.get("b_down"))


def _moe(layer, p, x, k: KernelConfig):
    flat = x.reshape(-1, x.shape[-1])
    router_logits = F.linear(flat, p["router"])
    weights, experts = nn.moe.route(layer, router_logits)
    out = kernels.moe_experts(flat, weights, experts, p["w_gate"], p["w_up"], p["w_down"],
                              activation=layer.activation, impl=k.moe)
    return out.reshape(x.shape), router_logits


def loss(config, params, batch, k: KernelConfig):
    tokens, targets = batch["tokens"], batch["targets"]
    positions = torch.arange(tokens.shape[1]).expand(tokens.shape)
    h = nn.embedding.apply(params["embed"]["tokens"], tokens)
    if config.positions == "learned":
        h = h + nn.embedding.apply(params["embed"]["positions"], positions)
    rot = models.decoder.rotary_layer(config)
    rope = None if rot is None else nn.rotary.cos_sin(rot, positions, dtype=h.dtype)
    router_logits = []
    for index, p in enumerate(params["layers"]):
        layer = models.decoder.block_layer(config, index)
        h = h + _attention(layer.attention, p["attention"], _norm(p["attention_norm"], h, layer.norm_eps, k),
                           rope, batch.get("segment_ids"), k)
        x = _norm(p["mlp_norm"], h, layer.norm_eps, k)
        if layer.ffn_name == "moe":
            out, logits = _moe(layer.ffn, p["moe"], x, k)
            router_logits.append(logits)
        else:
            out = _mlp(layer.ffn, p["mlp"], x, k)
        h = h + out
    h = _norm(params["final_norm"], h, config.norm_eps, k)
    head = params["embed"]["tokens"] if config.tie_embeddings else params["lm_head"]["w"]
    total = kernels.fused_linear_cross_entropy(h, head, targets, loss_mask=batch.get("loss_mask"),
                                               impl=k.cross_entropy)
    if config.moe is not None:
        total = total + config.moe.aux_loss_coef * nn.moe.load_balancing_loss(
            router_logits, config.moe.n_experts, config.moe.top_k)
        total = total + config.moe.z_loss_coef * nn.moe.router_z_loss(router_logits)
    return total
