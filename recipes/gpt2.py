"""GPT-2 small (124M) pre-training on your prepared data, as in nanoGPT's OpenWebText run.

    fastllm prepare openwebtext/ --tokenizer gpt2/ --output data/gpt2
    fastllm train recipes/gpt2.py data.datasets=data/gpt2

One GPU: 12 x 1024-token micro-batches, 40-step accumulation (~0.5M tokens per step), bf16.
"""

from fastllm.data import DataConfig
from fastllm.train.config import Config, ModelSection, OptimSection, RunConfig, TrainSection


def config() -> Config:
    return Config(
        run=RunConfig(dir="runs/gpt2"),
        model=ModelSection(preset="gpt2"),
        data=DataConfig(datasets=("data/gpt2",), seq_len=1024, validation_fraction=0.0005),
        train=TrainSection(steps=600_000, batch_size=480, micro_batch_size=12, precision="bf16", log_every=10,
                           eval_every=2000, checkpoint_every=2000),
        optim=OptimSection(lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, warmup_steps=2000, min_lr_ratio=0.1),
    )
