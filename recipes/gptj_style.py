"""A model of your own, trained by ``fastllm train``: a GPT-J-style parallel-block transformer.

    fastllm train recipes/gptj_style.py                                   # one process, CPU
    torchrun --nproc-per-node 4 -m fastllm train recipes/gptj_style.py mesh.tensor=4 mesh.rules.seq=tensor

GPT-J (Wang & Komatsuzaki 2021) computes attention and the MLP side by side from one LayerNorm,

    x = x + attention(norm(x)) + mlp(norm(x))

rotates only part of each head, and has an untied LM head with a bias. The model is built from
``fastllm.nn`` layers in this file (docs/custom_models.md walks through it): parameter
declarations with logical dim names, and the parts the model runs (embedding, each block, head).
There is no sharding code here: the rules table lays out the names, so the same file trains on
one process, at data=4 with ZeRO-3, at tensor=4 with sequence parallelism, or data=2 x tensor=2.

The data is the quickstart's: the Python standard library's own source, tokenized by a BPE
trained on it (nothing downloaded).
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from fastllm import nn
from fastllm.data import DataConfig
from fastllm.nn import ops
from fastllm.train.config import Config, OptimSection, RunConfig, TrainSection
from fastllm.train.quickstart import prepare_quickstart


@dataclass(frozen=True)
class ParallelConfig:
    vocab_size: int = 2048
    embed_dim: int = 128
    n_heads: int = 4
    n_layers: int = 4
    mlp_dim: int = 512
    rotary_fraction: float = 0.5
    norm_eps: float = 1e-5


@dataclass(frozen=True)
class RecipeConfig(Config):
    model: ParallelConfig = field(default_factory=ParallelConfig)


def attention_layer(config: ParallelConfig) -> nn.Attention:
    return nn.Attention(embed_dim=config.embed_dim, n_heads=config.n_heads)


def mlp_layer(config: ParallelConfig) -> nn.MLP:
    return nn.MLP(embed_dim=config.embed_dim, mlp_dim=config.mlp_dim, activation="gelu_tanh", gated=False,
                  bias=True)


def param_specs(config: ParallelConfig) -> dict:
    block = {
        "norm": nn.norm.params(config.embed_dim, kind="layernorm"),
        "attention": nn.attention.params(attention_layer(config)),
        "mlp": nn.mlp.params(mlp_layer(config)),
    }
    return {
        "embed": {"tokens": nn.embedding.params(config.vocab_size, config.embed_dim)},
        "layers": [block] * config.n_layers,  # declarations are immutable; each path draws its own values
        "final_norm": nn.norm.params(config.embed_dim, kind="layernorm"),
        "lm_head": nn.linear.params(config.embed_dim, config.vocab_size, bias=True, axes=("vocab", "embed")),
    }


def embed(config: ParallelConfig, params: tuple, carry: dict, batch: dict, layout) -> dict:
    tokens = batch["tokens"]
    h = nn.embedding.apply(params[0]["tokens"], tokens, layout=layout)  # [batch, seq, embed]
    rotary = nn.Rotary(head_dim=attention_layer(config).head_dim, fraction=config.rotary_fraction)
    cos, sin = nn.rotary.cos_sin(rotary, batch.get("positions", nn.rotary.positions_of(tokens)), dtype=h.dtype)
    return {"h": h, "cos": cos, "sin": sin}


def block(config: ParallelConfig, params: tuple, carry: dict, batch: dict, layout) -> dict:
    p, h = params[0], carry["h"]
    x = nn.norm.apply(p["norm"], h, eps=config.norm_eps)
    attended = nn.attention.apply(attention_layer(config), p["attention"], x, rope=(carry["cos"], carry["sin"]),
                                  segment_ids=batch.get("segment_ids"), layout=layout)
    return {**carry, "h": h + attended + nn.mlp.apply(mlp_layer(config), p["mlp"], x, layout=layout)}


def head(config: ParallelConfig, params: tuple, carry: dict, batch: dict, layout) -> dict:
    norm, lm_head = params
    h = nn.norm.apply(norm, carry["h"], eps=config.norm_eps)
    logits = ops.dense(layout, h, ops.STREAM, lm_head["w"], ("vocab", "embed"), lm_head["b"])  # [batch, seq, vocab]
    loss, valid = ops.cross_entropy(layout, logits, ("batch", "seq", "vocab"), batch["targets"], batch.get("loss_mask"))
    return {"loss": loss, "valid_tokens": valid}


def model(config: RecipeConfig) -> nn.Model:
    """The model ``fastllm train`` trains (a recipe's ``model(config)``): declarations and parts."""
    c = config.model
    parts = [nn.Part("embed", [("embed",)], embed, static=c)]
    parts += [nn.Part(f"layers.{i}", [("layers", i)], block, static=c, layer=i) for i in range(c.n_layers)]
    parts.append(nn.Part("head", [("final_norm",), ("lm_head",)], head, static=c))
    return nn.Model(param_specs(c), parts, config=c)


def config() -> RecipeConfig:
    return RecipeConfig(
        run=RunConfig(dir="runs/gptj_style"),
        data=DataConfig(datasets=("runs/gptj_style/data/tokens",), seq_len=128, validation_fraction=0.02, prefetch=2),
        train=TrainSection(steps=300, batch_size=16, log_every=10, eval_every=100, eval_batches=4, checkpoint_every=100),
        optim=OptimSection(lr=3e-3, warmup_steps=20, weight_decay=0.1, min_lr_ratio=0.1),
    )


def before_train(config: RecipeConfig) -> RecipeConfig:
    """Tokenize the standard library's source with a BPE of the model's vocabulary (once)."""
    tokens, _ = prepare_quickstart(Path(config.run.dir) / "data", max_bytes=1_000_000,
                                   vocab_size=config.model.vocab_size)
    return dataclasses.replace(config, data=config.data.replace(datasets=(str(tokens),)))
