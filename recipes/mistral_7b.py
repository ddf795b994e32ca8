"""Mistral 7B (sliding-window attention) fine-tuning on your prepared data, on 8 GPUs.

    fastllm prepare my_data.jsonl --tokenizer Mistral-7B-v0.1/ --output data/mistral
    fastllm train recipes/mistral_7b.py data.datasets=data/mistral

Tensor parallel over pairs of GPUs, data parallel over 4 pairs with ZeRO-1, bf16, recomputation.
"""

from fastllm.data import DataConfig
from fastllm.train.config import Config, MeshSection, ModelSection, OptimSection, RunConfig, TrainSection, ZeroSection


def config() -> Config:
    return Config(
        run=RunConfig(dir="runs/mistral_7b"),
        model=ModelSection(preset="mistral-7b"),
        data=DataConfig(datasets=("data/mistral",), seq_len=4096, validation_fraction=0.01),
        train=TrainSection(steps=2_000, batch_size=64, micro_batch_size=2, precision="bf16", remat="block",
                           log_every=1, eval_every=200, checkpoint_every=200),
        optim=OptimSection(lr=2e-5, betas=(0.9, 0.95), weight_decay=0.0, warmup_steps=50, min_lr_ratio=0.1),
        mesh=MeshSection(data=4, tensor=2),
        zero=ZeroSection(stage=1),
    )
