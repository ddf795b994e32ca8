"""Mixtral 8x7B (sparse mixture of experts, top-2 of 8) fine-tuning on your prepared data.

    fastllm prepare my_data.jsonl --tokenizer Mixtral-8x7B-v0.1/ --output data/mixtral
    fastllm train recipes/mixtral_8x7b.py data.datasets=data/mixtral

47B parameters: ZeRO-3 over 16 data-parallel GPUs (parameters, gradients and AdamW state
sharded: about 47 GB per GPU), bf16, recomputation, 32 sequences of 4096 tokens per step. The
router's load-balancing loss (coefficient ``model.moe.aux_loss_coef``) is part of the training loss.
(Spreading the experts themselves over ranks, expert parallelism, is a rule on ``experts`` still to
come; until then mixture-of-experts models train with mesh.tensor=1.)
"""

from fastllm.data import DataConfig
from fastllm.train.config import Config, MeshSection, ModelSection, OptimSection, RunConfig, TrainSection, ZeroSection


def config() -> Config:
    return Config(
        run=RunConfig(dir="runs/mixtral_8x7b"),
        model=ModelSection(preset="mixtral-8x7b"),
        data=DataConfig(datasets=("data/mixtral",), seq_len=4096, validation_fraction=0.01),
        train=TrainSection(steps=2_000, batch_size=32, micro_batch_size=1, precision="bf16", remat="block",
                           log_every=1, eval_every=200, checkpoint_every=200),
        optim=OptimSection(lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0, warmup_steps=50, min_lr_ratio=0.1),
        mesh=MeshSection(data=16),
        zero=ZeroSection(stage=3),
    )
