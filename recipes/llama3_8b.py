"""Llama 3 8B continued pre-training on your prepared data, on one node of 8 GPUs.

    fastllm prepare my_corpus/ --tokenizer Meta-Llama-3-8B/ --output data/llama3
    fastllm train recipes/llama3_8b.py data.datasets=data/llama3

Data-parallel over 8 GPUs with ZeRO-3 (parameters, gradients and AdamW state sharded: 16 bytes per
parameter / 8), bf16 compute, per-block activation recomputation, 1M tokens per step.

On Hopper GPUs ``model.kernels.matmul=fp8`` runs the blocks' projections in FP8 (1.17x the bf16 step
at this width on one H100, docs/performance.md "FP8 projections"); it changes the rounding, so it is
an opt-in.
"""

from fastllm.data import DataConfig
from fastllm.train.config import Config, MeshSection, ModelSection, OptimSection, RunConfig, TrainSection, ZeroSection


def config() -> Config:
    return Config(
        run=RunConfig(dir="runs/llama3_8b"),
        model=ModelSection(preset="llama3-8b"),
        data=DataConfig(datasets=("data/llama3",), seq_len=8192, validation_fraction=0.001),
        train=TrainSection(steps=10_000, batch_size=128, micro_batch_size=1, precision="bf16", remat="block",
                           log_every=1, eval_every=500, checkpoint_every=500),
        optim=OptimSection(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, warmup_steps=500, min_lr_ratio=0.1),
        mesh=MeshSection(data=8),
        zero=ZeroSection(stage=3),
    )
