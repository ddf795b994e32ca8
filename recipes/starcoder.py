"""StarCoder-1B (multi-query attention, learned positions) pre-training on prepared code.

    fastllm prepare my_code.jsonl --tokenizer starcoderbase-1b/ --output data/code
    fastllm train recipes/starcoder.py data.datasets=data/code

One GPU, bf16, 8k-token context, documents packed without attending across their boundaries.
"""

from fastllm.data import DataConfig
from fastllm.train.config import Config, ModelSection, OptimSection, RunConfig, TrainSection


def config() -> Config:
    return Config(
        run=RunConfig(dir="runs/starcoder"),
        model=ModelSection(preset="starcoder-1b"),
        data=DataConfig(datasets=("data/code",), seq_len=8192, validation_fraction=0.001),
        train=TrainSection(steps=50_000, batch_size=32, micro_batch_size=2, precision="bf16", remat="block",
                           log_every=10, eval_every=1000, checkpoint_every=1000),
        optim=OptimSection(lr=4e-4, betas=(0.9, 0.95), weight_decay=0.1, warmup_steps=2000, min_lr_ratio=0.1),
    )
