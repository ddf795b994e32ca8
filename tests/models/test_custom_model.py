"""A new architecture composed from fastllm.nn in user code: a GPT-J-style parallel block model.

GPT-J (Wang & Komatsuzaki 2021) runs attention and MLP side by side from one LayerNorm,
``x = x + attention(norm(x)) + mlp(norm(x))``, with partial rotary embeddings and an untied,
biased LM head. Nothing here is in the library: it is what a user would write.
"""

from dataclasses import dataclass

import torch

from fastllm import nn, random, tree


@dataclass(frozen=True)
class ParallelConfig:
    vocab_size: int = 64
    embed_dim: int = 32
    n_heads: int = 4
    n_layers: int = 2
    mlp_dim: int = 64
    rotary_fraction: float = 0.5
    norm_eps: float = 1e-5


def attention_layer(config):
    return nn.Attention(embed_dim=config.embed_dim, n_heads=config.n_heads)


def mlp_layer(config):
    return nn.MLP(embed_dim=config.embed_dim, mlp_dim=config.mlp_dim, activation="gelu_tanh",
                  gated=False, bias=True)


def param_specs(config):
    block = {
        "norm": nn.norm.params(config.embed_dim, kind="layernorm"),
        "attention": nn.attention.params(attention_layer(config)),
        "mlp": nn.mlp.params(mlp_layer(config)),
    }
    return {
        "embed": {"tokens": nn.embedding.params(config.vocab_size, config.embed_dim)},
        "layers": [block] * config.n_layers,  # specs are immutable; paths still differ per layer
        "final_norm": nn.norm.params(config.embed_dim, kind="layernorm"),
        "lm_head": nn.linear.params(config.embed_dim, config.vocab_size, bias=True, axes=("vocab", "embed")),
    }


def apply(config, params, tokens):
    attention, mlp = attention_layer(config), mlp_layer(config)
    positions = torch.arange(tokens.shape[1]).expand(tokens.shape)
    rotary = nn.Rotary(head_dim=attention.head_dim, fraction=config.rotary_fraction)
    rope = nn.rotary.cos_sin(rotary, positions)
    h = nn.embedding.apply(params["embed"]["tokens"], tokens)
    for layer in params["layers"]:
        x = nn.norm.apply(layer["norm"], h, eps=config.norm_eps)
        h = h + nn.attention.apply(attention, layer["attention"], x, rope=rope) + nn.mlp.apply(mlp, layer["mlp"], x)
    return nn.linear.apply(params["lm_head"], nn.norm.apply(params["final_norm"], h, eps=config.norm_eps))


def loss(config, params, tokens):
    logits = apply(config, params, tokens[:, :-1])
    return nn.cross_entropy(logits, tokens[:, 1:])[0]


def test_parallel_block_model_has_axes_for_every_leaf():
    config = ParallelConfig()
    specs = param_specs(config)
    params = nn.init(specs, random.key(0))
    axes = tree.flatten(nn.axes(specs), is_leaf=tree.is_axes)
    flat = tree.flatten(params)
    assert axes.keys() == flat.keys()
    assert axes["layers.1.attention.wq"] == ("heads", "head_dim", "embed")
    assert axes["layers.0.mlp.b_up"] == ("mlp",)
    assert axes["lm_head.w"] == ("vocab", "embed") and axes["lm_head.b"] == ("vocab",)
    known = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp"}
    assert all(set(names) <= known for names in axes.values())
    # The two layers share a declaration but not their values: each path has its own stream.
    assert not torch.equal(flat["layers.0.attention.wq"], flat["layers.1.attention.wq"])


def test_parallel_block_model_trains():
    config = ParallelConfig()
    params = nn.init(param_specs(config), random.key(0))
    # A learnable pattern: every sequence counts up by 3 modulo the vocabulary.
    starts = torch.randint(0, config.vocab_size, (8, 1), generator=torch.Generator().manual_seed(0))
    tokens = (starts + 3 * torch.arange(17)) % config.vocab_size
    grad_fn = torch.func.grad_and_value(lambda p: loss(config, p, tokens))
    first = None
    for _ in range(20):
        grads, value = grad_fn(params)
        first = value.item() if first is None else first
        params = tree.map(lambda p, g: p - 0.5 * g, params, grads)
    final = loss(config, params, tokens).item()
    assert final < 0.5 * first, (first, final)
